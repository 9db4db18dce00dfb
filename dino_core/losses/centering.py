"""Turning the teacher's logits into targets: EMA centering or Sinkhorn-Knopp.

Two ways to keep the teacher from collapsing, both selectable for the DINO (CLS) and the iBOT
(patch) terms, as dinov2's ``train.centering`` is:

* ``"ema"``: subtract a running mean of the teacher's logits, then a sharp softmax (Caron et
  al. 2021, Eq. 4; iBOT, Zhou et al. 2022, keeps a center of its own for the patches).
* ``"sinkhorn_knopp"``: a few Sinkhorn-Knopp iterations that spread the batch evenly over the
  prototypes (SwAV, Caron et al. 2020, Sec. 3.1; DINOv2, Oquab et al. 2024, Sec. 4).

Every cross-process sum goes through an injected ``all_reduce_sum`` (identity without a
process group), and every function takes an optional ``valid`` row mask, so a fixed-size
buffer of which only some rows hold masked patches (a different number on every rank) is
handled without reshaping: invalid rows count nowhere and come back as zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from dino_core.losses.dino import identity

Reduce = Callable[[torch.Tensor], torch.Tensor]
Centering = Literal["ema", "sinkhorn_knopp"]


def _valid_rows(
    rows: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` in fp32 with the padding rows zeroed (whatever they held: inf, nan), and the
    ``(N, 1)`` fp32 weight of each row, 1 if it counts, else 0."""
    rows = rows.float()
    if valid is None:
        return rows, rows.new_ones(rows.shape[0], 1)
    if valid.shape != rows.shape[:1]:
        raise ValueError(f"valid is {tuple(valid.shape)}, expected ({rows.shape[0]},)")
    keep = valid.reshape(-1, 1).to(rows.device)
    return torch.where(keep, rows, 0.0), keep.float()


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    temp: float,
    n_iterations: int = 3,
    all_reduce_sum: Reduce = identity,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assignment probabilities of the teacher's rows to K prototypes, balanced over the
    global batch by Sinkhorn-Knopp (SwAV, Caron et al. 2020, Alg. 1 with ``exp(s / temp)``).

    With ``Q = exp(s / temp)`` over the B valid rows of all ranks, each iteration rescales
    every prototype (column) to total mass 1/K, then every row to mass 1/B; the result is
    ``B Q``, so each valid row sums to 1. The 1/K and 1/B factors are global scalars that
    the next rescaling absorbs, as is the first division by the total; the total is kept only
    to hold every later sum at or below 1 (no overflow), and the two scalars are left out.
    Before the exponential each prototype's logits are shifted by their global mean over the
    valid rows; the first prototype rescaling cancels that shift exactly (so
    ``n_iterations >= 1``), and it saves a logit offset common to all rows from overflowing
    ``exp(s / 0.04)``. The count B enters that mean, so it is reduced with the logit sums
    (one collective); per-rank counts may differ, as iBOT's masked patches do.

    Args:
        teacher_logits: ``(N, K)``, this rank's rows (any float dtype; computed in fp32).
        temp: tau_t.
        n_iterations: prototype-then-row rescalings (dinov2: 3).
        all_reduce_sum: sums a tensor over processes (in place or not, the result is used).
            Called ``2 + n_iterations`` times, on ``(K + 1,)``, ``()`` and ``(1, K)``.
        valid: ``(N,)`` bool, the rows that take part (all when None).

    Returns:
        ``(N, K)`` fp32; each valid row sums to 1, padding rows are 0.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    logits, keep = _valid_rows(teacher_logits, valid)
    stats = all_reduce_sum(torch.cat([logits.sum(0), keep.sum(0)]))
    n_rows = stats[-1:].clamp(min=1.0)
    q = torch.where(keep > 0, torch.exp((logits - stats[:-1] / n_rows) / temp), 0.0)
    q = q / all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q = q / all_reduce_sum(q.sum(0, keepdim=True))  # every prototype gets the same mass
        row = q.sum(1, keepdim=True)
        q = q / torch.where(row > 0, row, 1.0)  # every valid row sums to 1; padding stays 0
    return q


def softmax_centered(
    teacher_logits: torch.Tensor, center: torch.Tensor, temp: float
) -> torch.Tensor:
    """``softmax((t - c) / temp)``, the centred and sharpened teacher (Caron et al. 2021, Eq. 4).

    Args:
        teacher_logits: ``(..., K)``.
        center: ``(1, K)`` (broadcast over the leading dimensions).
        temp: tau_t.

    Returns:
        ``(..., K)`` fp32 probabilities, no gradient.
    """
    with torch.no_grad():
        return F.softmax((teacher_logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def ema_center_update(
    center: torch.Tensor,
    teacher_logits: torch.Tensor,
    momentum: float,
    all_reduce_sum: Reduce = identity,
    valid: torch.Tensor | None = None,
    keep_if: torch.Tensor | None = None,
) -> None:
    """``c <- m c + (1 - m) mean(t)`` in place, the mean over the valid rows of all ranks.

    The row sum and the row count are summed over processes in one collective, so ranks that
    hold different numbers of rows (masked patches) are weighted by their rows, and a step
    with no valid row anywhere leaves the center as it is. Nothing waits on the host.

    Args:
        center: ``(1, K)`` fp32 buffer, updated in place.
        teacher_logits: ``(N, K)``, this rank's rows.
        momentum: m (0.9 for both the DINO and the iBOT center).
        all_reduce_sum: sums a ``(K + 1,)`` tensor over processes.
        valid: ``(N,)`` bool, the rows that count (all when None).
        keep_if: a device bool; when False the center is left as it is.
    """
    logits, keep = _valid_rows(teacher_logits, valid)
    stats = all_reduce_sum(torch.cat([logits.sum(0), keep.sum(0)]))
    count = stats[-1]
    batch_mean = stats[:-1] / count.clamp(min=1.0)
    new = center * momentum + batch_mean * (1 - momentum)
    use = count > 0 if keep_if is None else (count > 0) & keep_if
    center.copy_(torch.where(use, new, center))
