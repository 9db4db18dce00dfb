"""The DINO loss: cross-entropy between a centred, sharpened teacher and the student.

Caron et al. 2021, Eq. (1)-(4) and Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def dino_cross_entropy(
    student_out: torch.Tensor, teacher_p: torch.Tensor, student_temp: float, n_global: int = 2
) -> torch.Tensor:
    """``1/P sum_{q, v != q} -p_q . log softmax(s_v / tau_s)``, each term a mean over the
    batch, ``P = n_global (n_crops - 1)`` (Caron et al. 2021, Eq. 3): the cross-entropy part of
    ``DINOLoss`` given the teacher's targets, whichever way they were centred (EMA center,
    Sinkhorn-Knopp).

    Args:
        student_out: ``(n_crops * B, K)``, rows grouped by crop (global crops first).
        teacher_p: ``(n_global * B, K)`` probabilities (no gradient flows into them).
        student_temp: tau_s.
        n_global: number of global crops.
    """
    n_crops = student_out.shape[0] // (teacher_p.shape[0] // n_global)
    student_logp = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    teacher_chunks = teacher_p.detach().chunk(n_global)
    # sum_{v != q} -p_q . log p_v without a (teacher, student) pair loop: the local views'
    # log-probabilities are summed once and shared by every teacher view
    local_sum: torch.Tensor | float = (
        torch.stack(student_logp[n_global:]).sum(0) if n_crops > n_global else 0.0
    )
    total = student_out.new_zeros((), dtype=torch.float32)
    for q, p in enumerate(teacher_chunks):
        others = sum((student_logp[g] for g in range(n_global) if g != q), local_sum)
        total = total - (p * others).sum(dim=-1).mean()
    return total / (n_global * (n_crops - 1))


class DINOLoss(nn.Module):
    """``H(P_t, P_s)`` averaged over every (teacher global view, student view) pair but the
    same view, with the teacher's output centred and sharpened.

    The cross-process mean is injected (``all_reduce_mean``), so the module runs without a
    process group (identity) and in DDP (an all-reduce average) alike.

    Args:
        out_dim: K.
        student_temp: tau_s (0.1).
        center_momentum: m of ``c <- m c + (1 - m) mean(t)`` (0.9).
        all_reduce_mean: maps a per-process tensor to its mean over processes.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = identity,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.all_reduce_mean = all_reduce_mean
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        teacher_temp: float,
        n_global: int = 2,
        update_center: bool = True,
    ) -> torch.Tensor:
        """Computes the loss, then updates the center.

        Args:
            student_out: ``(n_crops * B, K)``, rows grouped by crop (global crops first).
            teacher_out: ``(n_global * B, K)``, the teacher on the global crops.
            teacher_temp: tau_t of this iteration.
            n_global: number of global crops.
            update_center: update the center now; the training step passes False and calls
                ``update_center`` itself once the loss is known to be finite.

        Returns:
            The scalar loss (fp32).
        """
        # stop-gradient: the teacher only receives the EMA of the student
        with torch.no_grad():
            teacher_p = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)
        loss = dino_cross_entropy(student_out, teacher_p, self.student_temp, n_global)
        if update_center:
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor, keep_if: torch.Tensor | None = None) -> None:
        """``c <- m c + (1 - m) mean(teacher_out)``, the mean over the global batch.

        ``keep_if``: a device bool; when False the center is left as it is (no host sync).
        """
        batch_center = self.all_reduce_mean(teacher_out.float().mean(dim=0, keepdim=True))
        new = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(new if keep_if is None else torch.where(keep_if, new, self.center))
