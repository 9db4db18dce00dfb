"""The teacher: an exponential moving average of the student (Caron et al. 2021, Sec. 3.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def ema_update(
    teacher_params: Sequence[torch.Tensor], student_params: Sequence[torch.Tensor], momentum: float
) -> None:
    """``t <- m t + (1 - m) s`` for every pair, in one fused multi-tensor kernel.

    ``momentum`` is a Python float taken from the schedule, so the update never waits on the
    device. Pass the plain parameter lists (not a DDP wrapper's ``.module``).
    """
    if len(teacher_params) != len(student_params):
        raise ValueError(
            f"teacher has {len(teacher_params)} parameters, student {len(student_params)}"
        )
    torch._foreach_lerp_(list(teacher_params), list(student_params), 1.0 - momentum)
