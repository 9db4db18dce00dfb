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
    # the DINOv2 recipe's iBOT parts: a learned mask token on the wrapper, and a second head
    # for the masked patches (dinov2's ibot.separate_head; off: the DINO head serves both)
    mask_token: bool = False
    ibot_separate_head: bool = False


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
    # "linear": lr * batch / 256 (the paper); "sqrt": lr * sqrt(batch / 1024), dinov2's
    # ``optim.scaling_rule: sqrt_wrt_1024`` (the base lr is then the lr at batch 1024)
    lr_scaling: str = "linear"


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


@dataclass(frozen=True)
class RecipeSpec:
    """The DINOv2/DINOv3 recipe on top of DINO (Oquab et al. 2024, Sec. 4; Siméoni et al.
    2025, Sec. 4), each part an option. The defaults switch every part off, so a run that
    does not ask for them is DINO v1, number for number; the comment of each field gives
    dinov2's ``ssl_default_config.yaml`` value, which the ``dinov2_*`` presets set."""

    # teacher targets of the DINO and iBOT terms: "ema" (a running center, DINO's; dinov2's
    # default config) or "sinkhorn_knopp" (dinov2's large runs, dinov3's only choice)
    centering: str = "ema"
    sinkhorn_iterations: int = 3  # dinov2: 3
    ibot_weight: float = 0.0  # dinov2: 1.0 (ibot.loss_weight); 0 = no iBOT, no masks
    ibot_center_momentum: float = 0.9  # dinov2: 0.9 (ibot.center_momentum)
    mask_probability: float = 0.5  # dinov2: 0.5 (ibot.mask_sample_probability)
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # dinov2: ibot.mask_ratio_min_max
    koleo_weight: float = 0.0  # dinov2: 0.1 (dino.koleo_loss_weight)
    koleo_distributed: bool = False  # dinov3's KoLeoLossDistributed: neighbours on all ranks
    layer_decay: float = 1.0  # dinov2: 0.9 (optim.layerwise_decay); 1 = none
    patch_embed_lr_mult: float = 1.0  # dinov2: 0.2 (optim.patch_embed_lr_mult)
    gram_weight: float = 0.0  # dinov3's anchoring phase: 2.0; 0 = no Gram anchoring
    gram_start_step: int = 0  # the first step with a non-zero weight
    gram_ramp_steps: int = 0  # half-cosine rise of the weight after the start
    gram_refresh_every_steps: int = 0  # re-snapshot the teacher every N steps; 0 = never
    gram_max_refreshes: int | None = None  # dinov3: 3 (gram.max_updates)
    gram_img_level: bool = True  # one Gram matrix per crop (dinov3: gram.img_level)
    gram_remove_neg: bool = False  # dinov3: gram.remove_neg

    @property
    def masked(self) -> bool:
        """Whether the student sees masked global crops (iBOT), and Gram needs patches."""
        return self.ibot_weight > 0

    @property
    def active(self) -> bool:
        """Whether any part differs from DINO v1's step (the optimiser's parts aside)."""
        return (self.ibot_weight > 0 or self.koleo_weight > 0 or self.gram_weight > 0
                or self.centering != "ema")
