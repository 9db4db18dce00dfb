"""Distillation in a run (``train.distill``): the frozen teacher, the student with its
projectors (and DINO head), its EMA copy and the objective, built from the config; the
teacher's fingerprint in every checkpoint; the checks made before Ray.

The student is ``model.arch`` (any ViT or the ResNet-50), wrapped in
``dino_core.distill.DistillStudent``; its EMA copy (``ema_copy``) takes the place of DINO's
teacher in ``TrainState``, so k-NN during training, the exported
``teacher_backbone.safetensors`` and ``dino eval`` read the distilled backbone exactly as
they read a DINO run's. The frozen teacher's weights are never saved: a checkpoint records
its URI and ``parameter_sha256``, and a resumed run reloads it and compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dino_core.builder import backbone_of, head_of
from dino_core.distill import DistillObjective, DistillStudent, FrozenTeacher
from dino_core.distill.student import ema_copy
from dino_core.losses.dino import identity
from dino_core.losses.dino_distill import DINODistillLoss
from dino_core.losses.feature_distill import FeatureDistillLoss
from dino_core.models import embed_dim_of
from service import storage
from service.config import DinoConfig, network_spec
from service.errors import CheckpointError, ConfigError
from service.models.teacher import SETTING, read_teacher
from service.storage import checkpoints as ckpt
from service.train.collectives import all_reduce_sum

FILES = (".safetensors", ".pth")


@dataclass
class Distillation:
    """The frozen teacher, the objective (the DINO center inside) and where the teacher
    came from."""

    teacher: FrozenTeacher
    objective: DistillObjective
    uri: str
    sha256: str

    def state_dict(self) -> dict[str, Any]:
        dino = self.objective.dino
        return {"teacher_uri": self.uri, "teacher_sha256": self.sha256,
                "center": dino.center.detach().cpu() if dino is not None else None}

    def load_state_dict(self, saved: dict[str, Any] | None, where: str) -> None:
        """Checks that the teacher is the one the checkpoint ``where`` was trained with,
        then restores the DINO center.

        Raises:
            CheckpointError: the checkpoint is not a distillation run's, or the teacher's
                weights differ (naming the URI and both hashes).
        """
        if saved is None:
            raise CheckpointError(f"{where} is a DINO run's checkpoint, not a distillation "
                                  f"run's; resume it without {SETTING}, or start a new run "
                                  "with another run_name")
        check_unchanged(self.uri, self.sha256, saved, where)
        dino = self.objective.dino
        if dino is not None and saved.get("center") is not None:
            dino.center.copy_(saved["center"].to(dino.center.device))


def unmoved(parts: Distillation, step: int) -> str:
    """The frozen teacher re-hashed after ``step`` steps: the line that says its weights are
    those it was read with; a RuntimeError (a bug: something trained or moved it) if not."""
    now = parts.teacher.sha256()
    if now != parts.sha256:
        raise RuntimeError(f"{SETTING}={parts.uri}: the frozen teacher's weights changed "
                           f"during the run (SHA-256 {parts.sha256} -> {now})")
    return f"[dino] the teacher's weights are unchanged after {step} steps (SHA-256 {now})"


def check_unchanged(uri: str, sha256: str, saved: dict[str, Any], where: str) -> None:
    """Raises a CheckpointError naming ``uri`` and both hashes when the teacher's weights
    (``sha256``) are not those the checkpoint ``where`` was trained with (``saved``)."""
    if saved["teacher_sha256"] != sha256:
        raise CheckpointError(
            f"{SETTING}={uri}: its weights have SHA-256 {sha256}, but {where} was trained "
            f"with the teacher {saved['teacher_uri']} of SHA-256 {saved['teacher_sha256']}; "
            "give that teacher again to resume, or another run_name to start a new run")


def objective(cfg: DinoConfig, world: int) -> DistillObjective:
    d, loss = cfg.train.distill, cfg.loss
    feature = None
    if d.objective != "dino":
        feature = FeatureDistillLoss(d.cls_weight, d.patch_weight, d.feature_loss)
    dino = None
    if d.with_dino:
        dino = DINODistillLoss(cfg.model.out_dim, loss.student_temp, loss.center_momentum,
                               loss.centering, all_reduce_sum=all_reduce_sum if world > 1
                               else identity)
    return DistillObjective(feature, dino, d.dino_weight)


def check_head(cfg: DinoConfig, head: nn.Module | None, setting: str = "model.out_dim") -> None:
    """The student's head must have the teacher head's K (``model.out_dim``, or an extra
    student's ``setting``)."""
    if head is None:
        return
    k = int(head.last_layer.weight.shape[0])
    if k != cfg.model.out_dim:
        raise ConfigError(f"{SETTING}={cfg.train.distill.teacher}: its DINO head has "
                          f"{k} prototypes, {setting}={cfg.model.out_dim}; set "
                          f"{setting}={k} for train.distill.objective="
                          f"{cfg.train.distill.objective}")


def load(cfg: DinoConfig) -> tuple[nn.Module, nn.Module | None]:
    """The teacher's backbone and head, or a ConfigError naming the setting."""
    d = cfg.train.distill
    if not d.teacher:
        raise ConfigError(f"{SETTING} is empty: this run distils a student from a teacher "
                          f"you give (train.distill.required=true); set {SETTING}=PATH, an "
                          "exported .safetensors, a run folder or checkpoint, or a reference "
                          "DINO or Meta DINOv2/v3 .pth")
    backbone, head = read_teacher(d.teacher, d.with_dino)
    check_head(cfg, head)
    for name, student in cfg.student_configs().items():
        check_head(student, head, f"train.distill.students.{name}.out_dim")
    return backbone, head


def build(cfg: DinoConfig, device: torch.device,
          world: int) -> tuple[DistillStudent, nn.Module, Distillation]:
    """The student, its EMA copy (the run's ``teacher``) and the distillation, on
    ``device``; the student starts from the seed set before (``seed_everything``)."""
    backbone, head = load(cfg)
    frozen = FrozenTeacher(backbone, head)
    sha = frozen.sha256()  # of the weights as read, before any device or dtype move
    student = build_student(cfg, frozen.embed_dim)
    parts = Distillation(frozen.to(device), objective(cfg, world).to(device),
                         cfg.train.distill.teacher, sha)
    return student, ema_copy(student), parts


def build_student(cfg: DinoConfig, teacher_dim: int) -> DistillStudent:
    """``model.*`` with the projectors to the teacher's width ``teacher_dim`` (and a DINO
    head), from the current seed; the run's student, or an extra one of its own config."""
    spec, d = network_spec(cfg), cfg.train.distill
    net = backbone_of(spec, spec.drop_path_rate)
    return DistillStudent(
        net, None if d.objective == "dino" else teacher_dim, d.projector_hidden_dim,
        head=head_of(spec, embed_dim_of(net)) if d.with_dino else None,
        project_cls=d.cls_weight > 0, project_patches=d.patch_weight > 0)


def check(cfg: DinoConfig) -> str | None:
    """Preflight: the teacher is given (when required), exists, reads as a backbone (and a
    DINO head, when asked) and fits the student's settings; each failure names
    ``train.distill.teacher``. Reads the whole file once, as the workers will; returns the
    SHA-256 of its weights (None: no distillation)."""
    d = cfg.train.distill
    if not d.on:
        return None
    if d.teacher.endswith(FILES):
        if not storage.exists(d.teacher):
            raise CheckpointError(f"{SETTING}: no file {d.teacher}")
    elif d.teacher:
        try:
            ckpt.resolve(d.teacher)
        except CheckpointError as err:
            raise CheckpointError(f"{SETTING}: {err}") from None
    try:
        backbone, head = load(cfg)
    except (ConfigError, CheckpointError):
        raise
    except (ValueError, RuntimeError, KeyError, OSError) as err:  # the readers' name the file
        raise CheckpointError(f"{SETTING}={d.teacher}: {err}") from None
    return FrozenTeacher(backbone, head).sha256()


def check_resumed(cfg: DinoConfig, sha256: str | None, checkpoint: str) -> None:
    """Preflight of a resume: the teacher's weights are those the checkpoint (its manifest)
    was trained with, so a changed teacher stops the run before Ray, not in every restarted
    worker group."""
    saved = ckpt.read_manifest(checkpoint).get("distill")
    if sha256 is not None and saved:
        check_unchanged(cfg.train.distill.teacher, sha256, saved, checkpoint)
