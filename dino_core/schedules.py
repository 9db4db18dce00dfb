"""Per-iteration schedules: lr, weight decay, teacher momentum and teacher temperature.

Every schedule is an array indexed by the global iteration, so a resumed run reads the
same value at the same step as an uninterrupted one (dinov2's ``build_schedulers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dino_core.specs import ScheduleSpec


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
    warmup_includes_end: bool = True,
) -> np.ndarray:
    """Linear warm-up from ``start_warmup_value`` to ``base_value`` over ``warmup_epochs``,
    then a half cosine from ``base_value`` to ``final_value``: the reference DINO code's
    ``utils.cosine_scheduler``, value for value. The warm-up includes its end point (its last
    iteration is at ``base_value``, and so is the first of the cosine), and the cosine part's
    ``i``-th value is at angle ``pi * i / n`` over its ``n`` iterations, so it ends one step
    short of ``final_value``. ``warmup_includes_end=False`` stops the warm-up one step short
    of ``base_value`` (this project's schedule before it matched the reference's).

    Returns:
        ``(epochs * niter_per_ep,)`` float64 array.
    """
    total = epochs * niter_per_ep
    warmup_iters = min(warmup_epochs * niter_per_ep, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters,
                         endpoint=warmup_includes_end)
    iters = np.arange(total - warmup_iters)
    n = max(len(iters), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / n))
    return np.concatenate((warmup, cosine))


def teacher_temp_schedule(
    warmup_temp: float, temp: float, warmup_epochs: int, epochs: int, niter_per_ep: int
) -> np.ndarray:
    """Linear per-epoch warm-up of tau_t from ``warmup_temp`` to ``temp``, then constant.

    The value changes once per epoch (as in the reference code) and is repeated for every
    iteration of that epoch.
    """
    warmup_epochs = min(warmup_epochs, epochs)
    per_epoch = np.concatenate(
        (np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp))
    )
    return np.repeat(per_epoch, niter_per_ep)


def scaled_lr(lr: float, global_batch_size: int, rule: str = "linear") -> float:
    """The linear scaling rule of the paper, ``lr * batch / 256``, or dinov2's square-root
    rule, ``lr * sqrt(batch / 1024)`` (its ``sqrt_wrt_1024``; Oquab et al. 2024 train with
    base lr 4e-3 at batch 1024 under it)."""
    if rule == "linear":
        return lr * global_batch_size / 256.0
    if rule == "sqrt":
        return lr * math.sqrt(global_batch_size / 1024.0)
    raise ValueError(f"lr scaling rule must be 'linear' or 'sqrt', got {rule!r}")


@dataclass(frozen=True)
class Schedules:
    """All per-iteration values of a run."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    niter_per_ep: int

    def at(self, it: int) -> dict[str, float]:
        """The values for global iteration ``it`` (clamped to the last one)."""
        i = min(it, len(self.lr) - 1)
        return {
            "lr": float(self.lr[i]),
            "weight_decay": float(self.weight_decay[i]),
            "momentum": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
        }


def build_schedules(
    spec: ScheduleSpec | None = None,
    *,
    epochs: int,
    niter_per_ep: int,
    global_batch_size: int,
    **changes: Any,
) -> Schedules:
    """The paper's schedules (Sec. 5 / Appendix): lr warm-up then cosine to ``min_lr``, lr
    scaled by ``global_batch_size / 256``; weight decay cosine 0.04 -> 0.4; teacher momentum
    cosine ``momentum_teacher`` -> 1; teacher temperature warm-up.

    Args:
        spec: The settings (default: ``ScheduleSpec()``).
        changes: Fields of ``ScheduleSpec`` to change, e.g. ``lr=2e-3``.
    """
    s = replace(spec or ScheduleSpec(), **changes)
    return Schedules(
        lr=cosine_schedule(
            scaled_lr(s.lr, global_batch_size, s.lr_scaling), s.min_lr, epochs, niter_per_ep,
            s.warmup_epochs,
            warmup_includes_end=s.warmup_includes_end,
        ),
        weight_decay=cosine_schedule(s.weight_decay, s.weight_decay_end, epochs, niter_per_ep),
        momentum=cosine_schedule(s.momentum_teacher, 1.0, epochs, niter_per_ep),
        teacher_temp=teacher_temp_schedule(
            s.warmup_teacher_temp, s.teacher_temp, s.warmup_teacher_temp_epochs, epochs,
            niter_per_ep,
        ),
        niter_per_ep=niter_per_ep,
    )


def splice_schedules(segments: list[tuple[int, Schedules]]) -> Schedules:
    """One run's schedules whose values change at given global steps: step ``t`` takes its
    values from the schedules of the segment in effect at ``t`` (segment ``k`` covers
    ``[start_k, start_{k+1})``). Each segment's schedules span the whole run and are indexed
    by the global step, so a value changed at step ``s`` continues as a fresh schedule of the
    new value would be at ``s`` (no restart of its warm-up or cosine at ``s``): population
    based training's exploits, replayed.

    Args:
        segments: ``[(start, schedules), ...]``, the first at step 0, starts increasing, all of
            one run (same length and ``niter_per_ep``). A start past the end changes nothing.

    Returns:
        The spliced ``Schedules``, arrays as long as the segments'.
    """
    if not segments or segments[0][0] != 0:
        raise ValueError("the first segment of a spliced schedule starts at step 0")
    starts = [start for start, _ in segments]
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"segment starts must increase strictly, got {starts}")
    first = segments[0][1]
    if any(len(s.lr) != len(first.lr) or s.niter_per_ep != first.niter_per_ep
           for _, s in segments):
        raise ValueError("every segment must be a schedule of the same run (length, "
                         "iterations per epoch)")
    out = {name: getattr(first, name).copy()
           for name in ("lr", "weight_decay", "momentum", "teacher_temp")}
    for start, sched in segments[1:]:
        for name, values in out.items():
            values[start:] = getattr(sched, name)[start:]
    return Schedules(**out, niter_per_ep=first.niter_per_ep)
