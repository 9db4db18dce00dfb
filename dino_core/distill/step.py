"""One distillation step, in DINO v1's ``train_one_epoch`` order: the frozen teacher on the
global crops, the student on all crops, the distillation terms, backward, clip, freeze the
last layer (DINO distillation), optimizer step, the student's EMA copy.

The teacher is never in the optimizer and never updated: it runs under ``no_grad`` in eval
mode (``FrozenTeacher``), and the EMA lists are those of the student and its own copy
(``ema_copy`` and ``dino_core.builder.ema_parameter_lists``), or empty for none. Several
students learn from one teacher forward (``teach``), each with a step of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dino_core.distill.objective import DistillObjective
from dino_core.distill.teacher import FrozenTeacher, TeacherOutput
from dino_core.monitors import teacher_stats
from dino_core.optim import set_schedule_values
from dino_core.step import StepConfig, StepOutput, agree_on_loss, autocast, backward_and_update

NO_EMA: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] = ((), ())


def teach(teacher: FrozenTeacher, crops: Sequence[torch.Tensor], n_global: int) -> TeacherOutput:
    """The frozen teacher on the global crops, once a step however many students learn from
    it (DINOv3's ``multidist_meta_arch``): ``targets`` of each ``train_step_distill``."""
    # only the global views pass through the teacher, which keeps its own precision
    return teacher(torch.cat(list(crops[:n_global])))


def train_step_distill(
    *,
    student: nn.Module,
    teacher: FrozenTeacher,
    objective: DistillObjective,
    optimizer: torch.optim.Optimizer,
    crops: Sequence[torch.Tensor],
    values: dict[str, float],
    step: int,
    cfg: StepConfig,
    ema_params: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] = NO_EMA,
    freeze_last_layer: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    clip_module: nn.Module | None = None,
    targets: TeacherOutput | None = None,
) -> StepOutput:
    """As ``dino_core.step.train_step``, with a frozen teacher; ``stats`` holds each weighted
    term (``loss_feat_cls``, ``loss_feat_patch``, ``loss_dino``) and, with DINO distillation,
    the teacher's entropy and KL to uniform.

    Args:
        student: the ``DistillStudent`` (possibly DDP-wrapped).
        teacher: the frozen teacher (with its head for DINO distillation).
        objective: the distillation terms (the DINO center inside).
        optimizer: AdamW over the student's parameters only.
        crops: ``[global_1, ..., local_1, ...]``, each ``(B, 3, H_i, W_i)`` on the device;
            without DINO distillation only the global ones are read.
        values: this step's ``lr``, ``weight_decay``, and ``momentum`` (of the student's EMA
            copy) and ``teacher_temp`` (DINO distillation) where they apply.
        step: global iteration, for error messages.
        cfg: run-wide settings (``n_global``, clipping, autocast, the non-finite policy).
        ema_params: (EMA copy's parameters, student's parameters); ``NO_EMA``: no copy.
        freeze_last_layer: drop the student head's last-layer gradients.
        scaler: a GradScaler for fp16; None otherwise.
        clip_module: the unwrapped student, whose parameters are clipped and frozen.
        targets: the teacher's output on these crops (``teach``), shared by several
            students; None: the teacher runs here.

    Raises:
        NonFiniteLossError: before anything is updated (see ``train_step``).
    """
    set_schedule_values(optimizer, values["lr"], values["weight_decay"])
    n_global, temp = cfg.n_global, values.get("teacher_temp")
    t = targets if targets is not None else teach(teacher, crops, n_global)
    stats: dict[str, torch.Tensor] = {}
    if objective.dino is not None and t.out is not None and temp is not None:
        stats = teacher_stats(t.out, objective.dino.center, temp)
    with autocast(crops[0].device.type, cfg):
        s = student(list(crops), n_global)
        terms = objective(s, t, temp, n_global)
        loss = torch.stack(list(terms.values())).sum()

    global_loss, finite = agree_on_loss(loss, optimizer, step, cfg)
    objective.update_centers(t, keep_if=finite if cfg.defer_nonfinite_check else None)
    backward_and_update(loss, clip_module if clip_module is not None else student, optimizer,
                        values.get("momentum", 0.0), freeze_last_layer, ema_params, cfg,
                        scaler, finite)
    stats |= {f"loss_{name}": term.detach() for name, term in terms.items()}
    return StepOutput(loss_tensor=global_loss, finite=finite, stats=stats)
