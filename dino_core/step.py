"""One DINO training step (Caron et al. 2021, Algorithm 1; DINO v1 ``train_one_epoch``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dino_core.ema import ema_update
from dino_core.losses.dino import DINOLoss, identity
from dino_core.losses.dino_chunked import chunked_dino_loss
from dino_core.monitors import teacher_stats
from dino_core.optim import cancel_last_layer_gradients, clip_gradients, set_schedule_values


class NonFiniteLossError(RuntimeError):
    """The loss is NaN or inf; raised before any parameter, optimizer state or center moved."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(
            f"non-finite DINO loss {value} at global step {step}; nothing was updated for this "
            "step (try a lower lr, a lower teacher temperature, or fp32)"
        )
        self.step = step
        self.value = value

    def __reduce__(self) -> tuple[type, tuple[int, float]]:
        # pickled with its own arguments, not the message (BaseException's default): Ray
        # carries a worker's error to the driver by pickling it
        return type(self), (self.step, self.value)


@dataclass
class StepConfig:
    """The per-run, not per-step, settings of the step."""

    n_global: int = 2
    clip_grad: float = 3.0  # 0 disables clipping
    autocast_dtype: torch.dtype | None = None  # torch.bfloat16 / torch.float16 / None (fp32)
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = field(default=identity)
    # False: read the loss on the host every step and raise NonFiniteLossError at once (one
    # device sync per step). True: never wait on the device; a non-finite step is turned
    # into a no-op on the device (needs a fused AdamW) and reported through
    # ``StepOutput.finite``, for the caller to check when it reads metrics anyway.
    defer_nonfinite_check: bool = False
    # the last layer, softmax and cross-entropy fused and chunked over K
    # (``dino_core.losses.dino_chunked``): the scores of the student are never materialised
    fused_head_loss: bool = False
    loss_chunk: int = 8192


@dataclass
class StepOutput:
    loss_tensor: torch.Tensor  # mean over processes, on the device
    finite: torch.Tensor  # device bool: False when the step was skipped as non-finite
    stats: dict[str, torch.Tensor]  # teacher entropy / KL to uniform, on the device

    @property
    def loss(self) -> float:
        """The loss as a Python float (waits for the device)."""
        return float(self.loss_tensor)


def train_step(
    *,
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: DINOLoss,
    optimizer: torch.optim.Optimizer,
    crops: Sequence[torch.Tensor],
    values: dict[str, float],
    step: int,
    freeze_last_layer: bool,
    ema_params: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
    cfg: StepConfig,
    scaler: torch.amp.GradScaler | None = None,
    clip_module: nn.Module | None = None,
) -> StepOutput:
    """Teacher on the global crops, student on all crops, loss, backward, clip, freeze the
    last layer, optimizer step, EMA.

    Args:
        student: the student (possibly DDP-wrapped ``MultiCropWrapper``).
        teacher: the teacher ``MultiCropWrapper`` (no gradients).
        loss_fn: the DINO loss (holds the center).
        optimizer: AdamW with ``param_groups`` (their lr and weight-decay multipliers).
        crops: ``[global_1, global_2, local_1, ...]``, each ``(B, 3, H_i, W_i)`` on the device.
        values: this step's ``lr``, ``weight_decay``, ``momentum``, ``teacher_temp``.
        step: global iteration, for error messages.
        freeze_last_layer: drop the head's last-layer gradients (first epoch(s)).
        ema_params: (teacher parameters, student parameters), matched lists.
        cfg: run-wide settings.
        scaler: a GradScaler for fp16; None otherwise.
        clip_module: the unwrapped student, whose parameters are clipped and frozen.

    Raises:
        NonFiniteLossError: before anything is updated (only without
            ``cfg.defer_nonfinite_check``; with it, the step is a device-side no-op and
            ``finite`` is False).
    """
    set_schedule_values(optimizer, values["lr"], values["weight_decay"])
    with autocast(crops[0].device.type, cfg):
        with torch.no_grad():
            # only the global views pass through the teacher
            teacher_out = teacher(list(crops[: cfg.n_global]))
        stats = teacher_stats(teacher_out, loss_fn.center, values["teacher_temp"])
        if cfg.fused_head_loss:
            z, weight = student(list(crops), split_last_layer=True)
            loss = chunked_dino_loss(z, teacher_out, weight, loss_fn.center,
                                     values["teacher_temp"], loss_fn.student_temp,
                                     cfg.n_global, cfg.loss_chunk)
        else:
            loss = loss_fn(student(list(crops)), teacher_out, values["teacher_temp"],
                           cfg.n_global, update_center=False)

    global_loss, finite = agree_on_loss(loss, optimizer, step, cfg)
    loss_fn.update_center(teacher_out, keep_if=None if not cfg.defer_nonfinite_check else finite)
    backward_and_update(loss, clip_module if clip_module is not None else student, optimizer,
                        values["momentum"], freeze_last_layer, ema_params, cfg, scaler, finite)
    return StepOutput(loss_tensor=global_loss, finite=finite, stats=stats)


def autocast(device_type: str, cfg: StepConfig) -> contextlib.AbstractContextManager:
    """The step's autocast (``cfg.autocast_dtype``), or nothing for fp32."""
    if cfg.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=cfg.autocast_dtype)


def agree_on_loss(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, step: int, cfg: StepConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss averaged over processes and whether it is finite (a device bool). The mean
    over processes makes every rank take the same decision on a bad step: raise
    ``NonFiniteLossError`` now, or (``cfg.defer_nonfinite_check``) make the optimizer step a
    device-side no-op."""
    global_loss = cfg.all_reduce_mean(loss.detach())
    finite = torch.isfinite(global_loss)
    if cfg.defer_nonfinite_check:
        _skip_optimizer_step_unless(optimizer, finite)
    else:
        value = global_loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(step, value)
    return global_loss, finite


def backward_and_update(
    loss: torch.Tensor,
    params_owner: nn.Module,
    optimizer: torch.optim.Optimizer,
    momentum: float,
    freeze_last_layer: bool,
    ema_params: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
    cfg: StepConfig,
    scaler: torch.amp.GradScaler | None,
    finite: torch.Tensor,
) -> None:
    """Backward, clip, freeze the last layer, optimizer step, EMA of the teacher."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.clip_grad > 0:
        clip_gradients(params_owner, cfg.clip_grad)
    if freeze_last_layer:
        cancel_last_layer_gradients(params_owner)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    ema_update(ema_params[0], ema_params[1], momentum,
               gate=finite if cfg.defer_nonfinite_check else None)


def _skip_optimizer_step_unless(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Makes the next ``optimizer.step()`` a no-op on the device when ``finite`` is False,
    without a host sync: the fused AdamW kernel skips parameters, moments and step count
    when its ``found_inf`` tensor is non-zero (the mechanism GradScaler uses)."""
    if not optimizer.defaults.get("fused"):
        raise ValueError("defer_nonfinite_check needs a fused optimizer (build_optimizer(fused=True))")
    optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
