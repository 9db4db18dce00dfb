"""The specs of a run's method, with the paper's defaults: the one home of those defaults.

Plain dataclasses without torch, so that a config can take its defaults from here and be
checked in a process that never imports torch. ``NetworkSpec`` is built by
``dino_core.builder``, ``ScheduleSpec`` by ``dino_core.schedules`` and ``MultiCropSpec`` by
the augmentations (``dino_core.augment.per_image``, ``dino_core.augment.batched``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkSpec:
    """Everything that fixes the shapes of the student and the teacher."""

    arch: str = "vit_small"
    patch_size: int = 16
    img_size: int = 224
    depth: int | None = None
    drop_path_rate: float = 0.1
    out_dim: int = 65536
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    # how a ViT resamples its position table to another grid: "reference" (the reference
    # DINO code's formula; released weights and the paper's numbers use it) or "timm"
    pos_embed_interpolation: str = "reference"


@dataclass(frozen=True)
class ScheduleSpec:
    """The schedule settings of a run, with the paper's defaults (Sec. 5 / Appendix); the one
    home of these defaults (``service.config`` takes its own from here)."""

    lr: float = 5e-4  # base lr at batch 256, scaled linearly with the global batch
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    # the lr warm-up reaches the base lr at its last step, as the reference's cosine_scheduler
    warmup_includes_end: bool = True
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0


@dataclass(frozen=True)
class MultiCropSpec:
    """The crops of DINO's multi-crop (paper Sec. 3.1, Table 10); the one home of their
    defaults, shared by ``MultiCropAugmentation``, ``BatchedMultiCrop`` and the service's
    config."""

    global_size: int = 224
    local_size: int = 96
    # the paper's best; the reference code defaults to 8
    n_local: int = 10
    # the reference recommends a wider (0.14, 1.0) when n_local=0
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)


MULTICROP = MultiCropSpec()
