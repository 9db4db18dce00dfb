"""Everything a run carries from step to step, built from the config, saved and restored.

``TrainState`` owns the plain ``dino_core`` modules (student, teacher, loss with its center,
optimizer, optional grad scaler), the schedules and the counters. A checkpoint's
``state.pt`` is ``TrainState.state_dict()``; ``restore`` loads the newest complete
checkpoint of the run (or ``train.resume``) into the plain modules, before any wrapping.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from dino_core import (
    DINOLoss,
    StepConfig,
    build_networks,
    build_optimizer,
    build_schedules,
    ema_parameter_lists,
)
from dino_core.losses.dino import identity
from dino_core.losses.koleo import no_gather
from dino_core.masking import MaskSampler
from dino_core.models import compile_backbone
from dino_core.models.masked import patch_grid
from dino_core.models.packed import PackedMultiCropWrapper
from dino_core.recipe import GramAnchor, RecipeLoss
from dino_core.schedules import splice_schedules
from service.config import DinoConfig, backbone_meta, network_spec, recipe_spec
from service.config.value_changes import schedule_segments
from service.errors import CheckpointError
from service.storage import checkpoints as ckpt
from service.train import distill
from service.train.collectives import (
    all_gather_rows_differentiable,
    all_reduce_mean,
    all_reduce_sum,
)
from service.train.context import RunContext
from service.train.progress import say
from service.train.students import Students


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def switch(value: str | bool, device: torch.device) -> bool:
    """``auto`` / true / false config switches; auto means true on GPUs."""
    return device.type == "cuda" if value == "auto" else bool(value)


def set_checkpointing(backbone: nn.Module) -> None:
    """timm's gradient checkpointing of the blocks (ViTs and ResNets have it)."""
    if not hasattr(backbone, "set_grad_checkpointing"):
        raise ValueError(f"{type(backbone).__name__} has no activation checkpointing")
    backbone.set_grad_checkpointing(True)


def seed_everything(*key: int) -> None:
    seed = int(np.random.default_rng(key).integers(2**31))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainState:
    """The modules, optimizer, schedules and counters of one rank."""

    def __init__(self, cfg: DinoConfig, ctx: RunContext, niter_per_ep: int) -> None:
        self.cfg, self.device, self.niter_per_ep = cfg, ctx.device, niter_per_ep
        world = ctx.world_size
        # distillation: the student with its projectors, its EMA copy in the teacher's place
        self.distill: distill.Distillation | None = None
        if cfg.train.distill.on:
            self.student, self.teacher, self.distill = distill.build(cfg, self.device, world)
        else:
            self.student, self.teacher = build_networks(network_spec(cfg))
        if cfg.train.packed_crops != "off":  # the same modules and keys, one call for all crops
            mode, masked = cfg.train.packed_crops, hasattr(self.student, "mask_token")
            self.student = PackedMultiCropWrapper(self.student.backbone, self.student.head, mode,
                                                  masked, self.student.ibot_head)
            self.teacher = PackedMultiCropWrapper(self.teacher.backbone, self.teacher.head, mode,
                                                  masked, self.teacher.ibot_head)
            self.teacher.requires_grad_(False)
        if world > 1 and self.device.type == "cuda":
            # BN heads and ResNets normalise over the global batch, as the reference does;
            # torch has no SyncBatchNorm on CPU, where each worker uses its own batch
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.student.to(self.device)
        self.teacher.to(self.device)
        self.ema_params = ema_parameter_lists(self.teacher, self.student)
        # a deferred non-finite check skips bad steps inside the fused AdamW kernel
        self.defer_check = switch(cfg.train.defer_nonfinite_check, self.device)
        self.recipe = r = recipe_spec(cfg)
        self.optimizer = build_optimizer(self.student, fused=True if self.defer_check else None,
                                         layer_decay=r.layer_decay,
                                         patch_embed_lr_mult=r.patch_embed_lr_mult)
        reduce = all_reduce_mean if world > 1 else identity
        self.loss_fn = DINOLoss(cfg.model.out_dim, cfg.loss.student_temp,
                                cfg.loss.center_momentum, reduce).to(self.device)
        # the DINOv2/DINOv3 recipe: its losses (the iBOT center), the masks of the global
        # crops (a generator per rank, reseeded every step) and the Gram teacher's snapshot
        self.recipe_loss: RecipeLoss | None = None
        self.mask_sampler: MaskSampler | None = None
        self.gram: GramAnchor | None = None
        if r.active:
            self.recipe_loss = RecipeLoss(
                self.loss_fn, r, all_reduce_sum if world > 1 else identity,
                all_gather_rows_differentiable if world > 1 else no_gather,
                cfg.train.fused_head_loss).to(self.device)
            self.mask_grid = patch_grid(self.student.backbone, cfg.aug.global_size)
            if r.masked:
                self.mask_sampler = MaskSampler(self.mask_grid, cfg.train.seed,
                                                r.mask_probability, r.mask_ratio)
            if r.gram_weight > 0:
                self.gram = GramAnchor(self.teacher.backbone, r).to(self.device)
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if self.amp_dtype == torch.float16 else None)
        self.step_cfg = StepConfig(clip_grad=cfg.optim.clip_grad, autocast_dtype=self.amp_dtype,
                                   all_reduce_mean=reduce, defer_nonfinite_check=self.defer_check,
                                   fused_head_loss=cfg.train.fused_head_loss)
        # train.value_changes: each segment's schedules from step 0, taken from its start on
        self.sched = splice_schedules([
            (step, build_schedules(spec, epochs=cfg.train.epochs, niter_per_ep=niter_per_ep,
                                   global_batch_size=cfg.train.batch_size))
            for step, spec in schedule_segments(cfg)])
        self.epoch, self.global_step, self.batch_in_epoch = 0, 0, 0
        self.skipped_steps = 0
        self.data_streams = 1  # loader streams of the epoch in progress (packed data)
        # distillation's extra students, fed by the same teacher forward (own random state)
        self.students = Students.build(cfg, self.device, world, self.distill,
                                       fused=True if self.defer_check else None,
                                       scaled=self.scaler is not None)

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        total = t.epochs * self.niter_per_ep
        return min(total, t.max_steps) if t.max_steps else total

    @property
    def epoch_label(self) -> int:
        """The epoch (1-based) the last step belongs to, as every console line numbers it
        (``self.epoch`` counts finished epochs)."""
        return self.epoch + 1 if self.batch_in_epoch or self.epoch == 0 else self.epoch

    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.train.epochs or self.global_step >= self.total_steps

    def compile(self) -> None:
        """In place, after restoring: parameter names (checkpoints, EMA pairs) do not change.
        Also switches on activation checkpointing of the student (``train.*``)."""
        if self.cfg.train.activation_checkpointing:
            set_checkpointing(self.student.backbone)
        if switch(self.cfg.train.compile, self.device):
            compile_backbone(self.student.backbone)
            compile_backbone(self.teacher.backbone)
            if self.distill is not None:  # the frozen teacher: most of a step's FLOPs when large
                compile_backbone(self.distill.teacher.backbone)
        self.students.compile(self.cfg.train.activation_checkpointing,
                              switch(self.cfg.train.compile, self.device))

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "center": self.loss_fn.center.detach().cpu(),
            **self.recipe_state(),
            # distillation: the frozen teacher's URI and hash (not its weights), the center
            **({"distill": self.distill.state_dict()} if self.distill is not None else {}),
            **({"students": self.students.state_dict()} if self.students else {}),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "data_streams": self.data_streams,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
            "config": self.cfg.model_dump(mode="json"),
            "backbone_meta": backbone_meta(self.cfg),
        }

    def masks(self, batch: int) -> torch.Tensor:
        """``(n_global * B, N)`` iBOT masks of this step's global crops (all False without
        iBOT: KoLeo, Sinkhorn-Knopp or Gram alone mask nothing)."""
        n = self.step_cfg.n_global * batch
        if self.mask_sampler is not None:
            return self.mask_sampler(n)
        return torch.zeros(n, self.mask_grid[0] * self.mask_grid[1], dtype=torch.bool)

    def recipe_state(self) -> dict[str, Any]:
        """The recipe's own state: the iBOT center, the mask generator, the Gram snapshot."""
        out: dict[str, Any] = {}
        if self.recipe_loss is not None:
            out["ibot_center"] = self.recipe_loss.ibot.center.detach().cpu()
        if self.mask_sampler is not None:
            out["masks"] = self.mask_sampler.state_dict()
        if self.gram is not None:
            out["gram_teacher"] = self.gram.backbone.state_dict()
        return out

    def load_state_dict(self, s: dict[str, Any], where: str = "the checkpoint") -> None:
        if self.distill is not None:  # the same frozen teacher, before any weight is loaded
            self.distill.load_state_dict(s.get("distill"), where)
        elif "distill" in s:
            raise CheckpointError(f"{where} is a distillation run's checkpoint: resume it "
                                  f"with train.distill.teacher={s['distill']['teacher_uri']}")
        if self.students or "students" in s:  # train.distill.students, each by name
            self.students.load_state_dict(s.get("students"), where)
        self.student.load_state_dict(s["student"], strict=True)
        self.teacher.load_state_dict(s["teacher"], strict=True)
        self.optimizer.load_state_dict(s["optimizer"])
        self.loss_fn.center.copy_(s["center"].to(self.device))
        if self.recipe_loss is not None:
            self.recipe_loss.ibot.center.copy_(s["ibot_center"].to(self.device))
        if self.mask_sampler is not None:
            self.mask_sampler.load_state_dict(s["masks"])
        if self.gram is not None:
            self.gram.backbone.load_state_dict(s["gram_teacher"], strict=True)
        if self.scaler and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.batch_in_epoch = s["epoch"], s["batch_in_epoch"]
        self.global_step, self.skipped_steps = s["global_step"], s.get("skipped_steps", 0)
        self.data_streams = s.get("data_streams", 1)

    def restore(self, run_url: str, ctx: RunContext) -> str | None:
        """Loads the newest complete checkpoint of this run, else ``train.resume``; returns
        where it came from (None: a fresh start).

        The run's storage directory is scanned rather than trusting only the scheduler's
        record (``ctx.registered_checkpoint()``): a worker killed right after writing a
        checkpoint dies before Ray's controller registers it, and the restarted group would
        otherwise start from an older one, or from scratch. Damaged ones (manifest missing or
        not matching) are skipped with a warning.
        """
        candidates = ckpt.checkpoint_dirs(run_url)
        found = ckpt.load_latest_valid(candidates) if candidates else None
        registered = ctx.registered_checkpoint()
        if found is not None and registered is not None and ctx.rank == 0:
            if registered.rstrip("/") != str(found[0]).rstrip("/"):
                say(f"[dino] using {found[0]}: newer than Ray's last registered checkpoint "
                    f"{registered} (a worker died before reporting it)")
        if found is None and self.cfg.train.resume:
            found = ckpt.load(self.cfg.train.resume)
        if found is None:
            return None
        uri, s = found
        self.load_state_dict(s, str(uri))
        if ctx.rank == 0:
            say(f"[dino] resumed from {uri} at epoch {self.epoch_label} step {self.global_step}")
        return str(uri)
