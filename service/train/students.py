"""Distillation's extra students (``train.distill.students``): several students learn from
one forward of the frozen teacher per step, as DINOv3's ``multidist_meta_arch`` trains its
ViT-S/B/L from one ViT-7B forward.

The run's own student is ``model.*`` (``TrainState.student``); each extra one is the run's
config with its ``model.*`` overrides (``DinoConfig.student_configs``) and has everything
the run's student has, apart: its projectors (and DINO head with its center), its AdamW on
the run's lr / weight-decay schedules, its EMA copy (what is exported, to
``students/<name>/teacher_backbone.safetensors``), its grad scaler, its section of the
checkpoint (``students.<name>``) and its metrics (``<name>/loss``, ``<name>/loss_feat_cls``,
...). Each starts from a seed of its own (the run's seed and its name), drawn aside from
the run's random state, so adding students changes nothing of the run's own student.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dino_core import build_optimizer, ema_parameter_lists
from dino_core.distill import DistillObjective, DistillStudent, TeacherOutput, train_step_distill
from dino_core.distill.student import ema_copy
from dino_core.models import compile_backbone
from service.config import DinoConfig, recipe_spec
from service.errors import CheckpointError
from service.train import distill

FOLDER = "students"  # students/<name>/ in the run's folder and the tracker's artifacts


@dataclass
class ExtraStudent:
    """One extra student: ``student`` trains, ``ema`` is its EMA copy (exported);
    ``model`` is ``student`` as the step calls it (DDP over several workers)."""

    name: str
    cfg: DinoConfig
    student: DistillStudent
    ema: nn.Module
    objective: DistillObjective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    model: nn.Module

    def __post_init__(self) -> None:
        self.ema_params = ema_parameter_lists(self.ema, self.student)

    def state_dict(self) -> dict[str, Any]:
        dino = self.objective.dino
        return {"student": self.student.state_dict(), "teacher": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "center": dino.center.detach().cpu() if dino is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.student.load_state_dict(s["student"], strict=True)
        self.ema.load_state_dict(s["teacher"], strict=True)
        self.optimizer.load_state_dict(s["optimizer"])
        dino = self.objective.dino
        if dino is not None:
            dino.center.copy_(s["center"].to(dino.center.device))
        if self.scaler and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])


def seed_of(cfg: DinoConfig, name: str) -> int:
    """The initial weights' seed of the student ``name``: the same on every rank (DDP also
    broadcasts rank 0's) and whatever the other students are."""
    key = (cfg.train.seed, zlib.crc32(name.encode()))
    return int(np.random.default_rng(key).integers(2**31))


class Students:
    """The extra students of a run (none: ``train.distill.students`` empty)."""

    def __init__(self, extras: list[ExtraStudent]) -> None:
        self.extras = extras

    def __bool__(self) -> bool:
        return bool(self.extras)

    @classmethod
    def build(cls, cfg: DinoConfig, device: torch.device, world: int,
              parts: distill.Distillation | None, fused: bool | None,
              scaled: bool) -> Students:
        """Each student of ``train.distill.students`` on ``device``, its optimizer as the
        run's (``fused``: AdamW's fused kernel; ``scaled``: an fp16 grad scaler)."""
        if parts is None:
            return cls([])
        r, extras = recipe_spec(cfg), []
        for name, one in cfg.student_configs().items():
            with torch.random.fork_rng(devices=[]):  # the run's own random state untouched
                torch.manual_seed(seed_of(cfg, name))
                student = distill.build_student(one, parts.teacher.embed_dim)
            if world > 1 and device.type == "cuda":  # as the run's student (TrainState)
                student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            student.to(device)
            optimizer = build_optimizer(student, fused=fused, layer_decay=r.layer_decay,
                                        patch_embed_lr_mult=r.patch_embed_lr_mult)
            extras.append(ExtraStudent(
                name, one, student, ema_copy(student), distill.objective(one, world).to(device),
                optimizer, torch.amp.GradScaler(device.type) if scaled else None, student))
        return cls(extras)

    def wrap(self, wrap_model: Callable[[nn.Module], nn.Module]) -> None:
        """Each student as the step calls it (``RunContext.wrap_model``), after restoring."""
        for x in self.extras:
            x.model = wrap_model(x.student)

    def compile(self, checkpointing: bool, compiled: bool) -> None:
        for x in self.extras:
            if checkpointing:  # timm's, as for the run's student (``state.set_checkpointing``)
                if not hasattr(x.student.backbone, "set_grad_checkpointing"):
                    raise ValueError(f"train.distill.students.{x.name}: "
                                     f"{type(x.student.backbone).__name__} has no activation "
                                     "checkpointing (train.activation_checkpointing)")
                x.student.backbone.set_grad_checkpointing(True)
            if compiled:
                compile_backbone(x.student.backbone)

    def step(self, targets: TeacherOutput, common: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One step of every student on the teacher's ``targets`` (its one forward of this
        step), with the run's step arguments ``common`` (crops, schedule values, ...);
        returns the stats, each under ``<name>/``: ``loss`` and the weighted terms.

        Raises:
            NonFiniteLossError: a student's loss is not finite (the run's policy applies).
        """
        stats: dict[str, torch.Tensor] = {}
        for x in self.extras:
            out = train_step_distill(**{
                **common, "student": x.model, "optimizer": x.optimizer, "scaler": x.scaler,
                "ema_params": x.ema_params, "clip_module": x.student},
                objective=x.objective, targets=targets)
            stats |= {f"{x.name}/loss": out.loss_tensor.detach(),
                      **{f"{x.name}/{k}": v for k, v in out.stats.items()}}
        return stats

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The ``students`` section of a checkpoint: each student's own state by name."""
        return {x.name: x.state_dict() for x in self.extras}

    def load_state_dict(self, saved: dict[str, dict[str, Any]] | None, where: str) -> None:
        """Restores every student from ``saved`` (a checkpoint's ``students`` section).

        Raises:
            CheckpointError: the checkpoint ``where`` holds other students than these.
        """
        have, want = sorted(saved or {}), sorted(x.name for x in self.extras)
        if have != want:
            raise CheckpointError(f"{where} holds the students {have} beside model.*, "
                                  f"train.distill.students names {want}; resume with the same "
                                  "students, or start a new run with another run_name")
        for x in self.extras:
            x.load_state_dict(saved[x.name])  # type: ignore[index]

    def exports(self) -> list[tuple[str, DinoConfig, nn.Module]]:
        """(folder in the run, config, EMA copy) of each student's exported backbone."""
        return [(f"{FOLDER}/{x.name}", x.cfg, x.ema) for x in self.extras]
