"""The reference DINO step's semantics, re-created with public APIs, for the step benchmark.

What the reference ``main_dino.train_one_epoch`` does per iteration, piece by piece, each
piece swappable for this project's version so the benchmark can add one lever at a time:

- attention: timm's ``Attention`` with ``fused_attn = False`` (``q @ k^T``, softmax, ``@ v``,
  the reference ViT's own formula) vs. fused SDPA;
- precision: fp16 autocast with a ``GradScaler`` (the reference's ``--use_fp16`` default) vs.
  bf16 autocast without a scaler, or fp32;
- loss: the reference ``DINOLoss`` (a loop over every teacher/student view pair);
- clipping: ``utils.clip_gradients`` (a norm and a Python comparison, so a host sync, per
  parameter) vs. :func:`dino_core.optim.clip_gradients` (multi-tensor kernels, no sync);
- EMA: a Python loop of ``mul_``/``add_`` per parameter vs. one ``_foreach_lerp_``;
- optimizer: ``torch.optim.AdamW`` with its defaults vs. the fused kernel;
- the non-finite check: ``math.isfinite(loss.item())`` every step vs. a deferred device flag.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dino_core.ema import ema_update
from dino_core.losses.dino import DINOLoss
from dino_core.optim import clip_gradients, param_groups


@dataclass(frozen=True)
class Levers:
    """Which of this project's levers are on; all off is the reference semantics."""

    sdpa: bool = False
    bf16: bool = False  # off: fp16 + GradScaler on CUDA, fp32 on CPU
    fused_adamw: bool = False
    foreach: bool = False  # clipping and EMA
    dino_loss: bool = False
    no_sync: bool = False


def set_fused_attention(model: nn.Module, on: bool) -> None:
    """Switches every timm ``Attention`` between SDPA and the explicit formula."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = on


def reference_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    n_crops: int,
    student_temp: float = 0.1,
    n_global: int = 2,
) -> torch.Tensor:
    """The reference ``DINOLoss.forward``: a loop over (teacher view, student view) pairs."""
    student_out = (student_output / student_temp).chunk(n_crops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach()
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher_out.chunk(n_global)):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


@torch.no_grad()
def reference_update_center(center: torch.Tensor, teacher_output: torch.Tensor,
                            momentum: float = 0.9) -> None:
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    center.copy_(center * momentum + batch_center * (1 - momentum))


@torch.no_grad()
def reference_clip(model: nn.Module, clip: float) -> None:
    """``utils.clip_gradients``: one norm and one host-side comparison per parameter."""
    for p in model.parameters():
        if p.grad is not None:
            clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
            if clip_coef < 1:  # a device-to-host sync
                p.grad.data.mul_(clip_coef)


@torch.no_grad()
def reference_ema(teacher_params: Sequence[torch.Tensor],
                  student_params: Sequence[torch.Tensor], m: float) -> None:
    for param_k, param_q in zip(teacher_params, student_params):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


class LeverStep:
    """One DINO iteration with the given levers; ``__call__(crops)`` runs a step."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ema_params: tuple,
                 out_dim: int, levers: Levers, device: torch.device,
                 clip: float = 3.0) -> None:
        self.student, self.teacher, self.ema_params = student, teacher, ema_params
        self.levers, self.device, self.clip = levers, device, clip
        set_fused_attention(student, levers.sdpa)
        set_fused_attention(teacher, levers.sdpa)
        self.dino_loss = DINOLoss(out_dim).to(device)
        self.center = self.dino_loss.center
        self.optimizer = torch.optim.AdamW(param_groups(student), lr=1e-4,
                                           weight_decay=0.04,
                                           fused=True if levers.fused_adamw else None)
        cuda = device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if levers.bf16 else torch.float16) if cuda else (
            torch.bfloat16 if levers.bf16 else None)
        self.scaler = torch.amp.GradScaler("cuda") if cuda and not levers.bf16 else None
        self.nonfinite = torch.zeros((), device=device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss(self, crops: list[torch.Tensor], teacher_temp: float = 0.04) -> tuple:
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out = self.student(crops)
            if self.levers.dino_loss:
                loss = self.dino_loss(student_out, teacher_out, teacher_temp, 2,
                                      update_center=False)
            else:
                loss = reference_loss(student_out, teacher_out, self.center, teacher_temp,
                                      len(crops))
        return loss, teacher_out

    def __call__(self, crops: list[torch.Tensor], momentum: float = 0.996) -> None:
        lv = self.levers
        loss, teacher_out = self.loss(crops)
        if lv.no_sync:
            finite = torch.isfinite(loss.detach())
            self.nonfinite += ~finite
        elif not math.isfinite(loss.item()):
            raise FloatingPointError("non-finite loss")
        if lv.dino_loss:
            self.dino_loss.update_center(teacher_out)
        else:
            reference_update_center(self.center, teacher_out)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        (clip_gradients if lv.foreach else reference_clip)(self.student, self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        (ema_update if lv.foreach else reference_ema)(*self.ema_params, momentum)
