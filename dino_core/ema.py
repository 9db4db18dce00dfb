"""The teacher: an exponential moving average of the student (Caron et al. 2021, Sec. 3.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def ema_update(
    teacher_params: Sequence[torch.Tensor],
    student_params: Sequence[torch.Tensor],
    momentum: float,
    gate: torch.Tensor | None = None,
) -> None:
    """``t <- m t + (1 - m) s`` for every pair, in one fused multi-tensor kernel.

    ``momentum`` is a Python float taken from the schedule, so the update never waits on the
    device. Pass the plain parameter lists (not a DDP wrapper's ``.module``). ``gate``, a
    device bool, turns the update into a no-op when False, still without a host sync.
    """
    if len(teacher_params) != len(student_params):
        raise ValueError(
            f"teacher has {len(teacher_params)} parameters, student {len(student_params)}"
        )
    teacher, student = list(teacher_params), list(student_params)
    if not teacher:  # nothing keeps an average (a distilled student without its EMA copy)
        return
    if gate is None:
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
        return
    step = torch._foreach_sub(student, teacher)
    torch._foreach_mul_(step, gate.to(teacher[0].dtype) * (1.0 - momentum))
    torch._foreach_add_(teacher, step)
