"""The run configuration: typed sections, one line of documentation per field.

The method's defaults have one home, ``dino_core``'s specs (``NetworkSpec``,
``ScheduleSpec``, ``MultiCropSpec``); the fields here take their defaults from there and
``service.config.specs`` builds the specs back from the sections without copying fields.
A bad value fails on construction, naming the field and the allowed range.

The module runs over 300 lines on purpose: it is the one list of every setting a user can
change, a section per class, and splitting it would scatter that list.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dino_core.specs import MULTICROP, NetworkSpec, RecipeSpec, ScheduleSpec
from service.config.sources import DataSource, parse_source

NET, SCHED, RECIPE = NetworkSpec(), ScheduleSpec(), RecipeSpec()
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "memory")


def url_scheme(url: str) -> str:
    """``s3`` for ``s3://b/k``, ``file`` for local paths."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


class _Section(BaseModel):
    # no setting is infinite or NaN: `optim.lr=inf` passed `gt=0` (NaN failed it only by
    # chance of the comparison) and trained to a non-finite loss (issue 27, item 2)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _family_patch(arch: str) -> int:
    """Patch size of a dinov2/dinov3 arch: its name's digits (``dinov2_vits14_reg4`` -> 14)."""
    return int("".join(ch for ch in arch.split("_")[1] if ch.isdigit()))


class ModelConfig(_Section):
    arch: Literal[
        "vit_tiny", "vit_small", "vit_base", "resnet50",
        "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
        "dinov2_vits14_reg4", "dinov2_vitb14_reg4", "dinov2_vitl14_reg4", "dinov2_vitg14_reg4",
        "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16",
    ] = Field(
        NET.arch, description="ViT-S/16 is the paper's main model (Table 2); dinov2_*/dinov3_* "
        "are Meta's architectures by their hub names (patch 14 / 16, LayerScale, registers, RoPE)"
    )
    patch_size: int = Field(NET.patch_size, ge=1, le=64, description="16 or 8 in the paper; 8 is ~4x slower; a dinov2/dinov3 arch's own (14/16) when not given")

    @model_validator(mode="before")
    @classmethod
    def _family_patch_default(cls, data: object) -> object:
        """A dinov2/dinov3 arch brings its patch size (the digits of its name) when none is given."""
        if isinstance(data, dict) and str(data.get("arch", "")).startswith("dinov"):
            if data.get("patch_size") is None:
                data = {**data, "patch_size": _family_patch(str(data["arch"]))}
        return data

    @model_validator(mode="after")
    def _family_patch_check(self) -> ModelConfig:
        if self.arch.startswith("dinov") and self.patch_size != _family_patch(self.arch):
            raise ValueError(f"model.patch_size={self.patch_size} contradicts model.arch="
                             f"{self.arch}, whose patch size is {_family_patch(self.arch)}; "
                             "leave model.patch_size out or set it to that")
        return self
    depth: int | None = Field(NET.depth, ge=1, le=48, description="override of the block count")
    drop_path_rate: float = Field(NET.drop_path_rate, ge=0.0, lt=1.0, description="stochastic depth, student")
    out_dim: int = Field(NET.out_dim, ge=2, description="K prototypes; 65536 works best (Table 9)")
    norm_last_layer: bool = Field(NET.norm_last_layer, description="fix prototype norms: stabilises ViT-S")
    use_bn_in_head: bool = Field(NET.use_bn_in_head, description="BN in the head: off for ViTs")
    head_hidden_dim: int = Field(NET.head_hidden_dim, ge=1, description="paper: 2048")
    head_bottleneck_dim: int = Field(NET.head_bottleneck_dim, ge=1, description="paper: 256")
    head_nlayers: int = Field(NET.head_nlayers, ge=1, le=8, description="paper: 3")
    pos_embed_interpolation: Literal["reference", "timm"] = Field(NET.pos_embed_interpolation, description="position table at other crop sizes: reference (DINO's bicubic by (grid + 0.1) / side: the paper's numbers and the released weights use it) or timm (antialiased)")


class DataConfig(_Section):
    path: str = Field(
        "procedural",
        description="image folder (local or fsspec URL), a packed dataset (its prefix or "
        "manifest.json; `dino data pack`) or 'procedural' for the built-in set",
    )
    procedural_size: int = Field(4096, ge=1, description="images in the procedural set")
    procedural_classes: int = Field(6, ge=2, le=8, description="shape classes (chance = 1/n)")
    procedural_image_size: int = Field(64, ge=8, description="side of generated images")
    procedural_colourful: bool = Field(
        True, description="random colours; false: light shapes on dark grey (quick demos)"
    )
    procedural_difficulty: float = Field(
        1.0, ge=0, le=1, description="1: cluttered, rotated, any size; 0: flat, upright, centred (demos)"
    )
    num_workers: int = Field(2, ge=0, le=64, description="data loader processes per worker")
    max_unreadable_fraction: float = Field(
        0.5, ge=0, le=1, description="stop when more of the images than this cannot be read: "
        "a folder of mostly broken files is a wrong path, not data; a few are skipped")
    seed: int = Field(0, description="seed of the procedural set")
    loader: Literal["torch", "ray_data"] = Field(
        "torch", description="torch: each worker reads its own share (packed data: its own "
        "shards); ray_data: Ray Data decodes on a pool of CPU tasks, on any node")
    shuffle_buffer: int = Field(
        1024, ge=0, description="packed data: samples held per loader process for shuffling "
        "within the per-epoch shard order (memory: this many encoded images)")
    trace_dir: str | None = Field(
        None, description="packed data, debugging: write the key of every image read, one "
        "file per epoch, rank and loader process (coverage checks)")

    @property
    def source(self) -> DataSource:
        return parse_source(self.path)


class AugConfig(_Section):
    global_size: int = Field(MULTICROP.global_size, ge=8, description="global crop side (paper: 224)")
    local_size: int = Field(MULTICROP.local_size, ge=8, description="local crop side (paper: 96)")
    n_local: int = Field(MULTICROP.n_local, ge=0, le=64, description="local crops: 2x224 + 10x96 is Table 10's")
    global_scale: tuple[float, float] = Field(MULTICROP.global_scale, description="RandomResizedCrop scale")
    local_scale: tuple[float, float] = Field(MULTICROP.local_scale, description="RandomResizedCrop scale")
    backend: Literal["auto", "per_image", "batched"] = Field(
        "auto",
        description="per_image: torchvision v2 in loader workers (reference semantics); "
        "batched: whole-batch tensor ops on the training device (GPU) after decoding to a "
        "square canvas; auto: batched",
    )
    canvas_size: int | None = Field(
        None, ge=8, description="batched: decoded canvas side (default global_size * 8 / 7)"
    )
    crop_source: Literal["auto", "canvas", "full_image"] = Field(
        "auto", description="batched: crop from a square canvas decoded in the loader, or "
        "from each full image, decoded in batches on the training device (JPEGs on CUDA with "
        "nvjpeg) as RandomResizedCrop does; auto: full_image for packed data on CUDA")

    @model_validator(mode="after")
    def _check(self) -> AugConfig:
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got ({lo}, {hi})")
        if self.local_size > self.global_size:
            raise ValueError(
                f"local_size ({self.local_size}) must be <= global_size ({self.global_size})"
            )
        return self


class LossConfig(_Section):
    student_temp: float = Field(0.1, gt=0, description="tau_s (paper: 0.1)")
    teacher_temp: float = Field(
        SCHED.teacher_temp, gt=0, le=1, description="tau_t: 0.04 is safe; above 0.07 training is unstable"
    )
    warmup_teacher_temp: float = Field(SCHED.warmup_teacher_temp, gt=0, le=1, description="tau_t at epoch 0")
    warmup_teacher_temp_epochs: int = Field(SCHED.warmup_teacher_temp_epochs, ge=0, description="paper: 30 when warming up")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="m of the center (paper: 0.9)")
    # the DINOv2/DINOv3 recipe (dino_core.recipe); every part off by default: DINO v1
    centering: Literal["ema", "sinkhorn_knopp"] = Field(
        RECIPE.centering, description="teacher targets of the DINO and iBOT terms: ema "
        "(DINO's running center; dinov2's default config) or sinkhorn_knopp (dinov2's large "
        "runs, dinov3)")
    sinkhorn_iterations: int = Field(RECIPE.sinkhorn_iterations, ge=1, le=100, description="dinov2: 3")
    ibot_weight: float = Field(
        RECIPE.ibot_weight, ge=0, description="iBOT masked-patch loss (dinov2: 1.0); 0: no "
        "masks, no mask token (DINO v1); needs a ViT")
    ibot_separate_head: bool = Field(
        NET.ibot_separate_head, description="a head of its own for the patches (dinov2's "
        "ibot.separate_head, off in its default config)")
    ibot_center_momentum: float = Field(RECIPE.ibot_center_momentum, ge=0, lt=1, description="m of the iBOT center (dinov2: 0.9)")
    mask_probability: float = Field(
        RECIPE.mask_probability, ge=0, le=1, description="fraction of global crops masked "
        "(dinov2: 0.5)")
    mask_ratio: tuple[float, float] = Field(
        RECIPE.mask_ratio, description="range of a masked crop's patch fraction, spread "
        "evenly over each batch (dinov2: [0.1, 0.5])")
    koleo_weight: float = Field(
        RECIPE.koleo_weight, ge=0, description="KoLeo on the student's global CLS features "
        "(dinov2: 0.1); 0: off")
    koleo_distributed: bool = Field(
        RECIPE.koleo_distributed, description="nearest neighbours among every rank's rows "
        "(dinov3); false: this rank's batch (dinov2)")

    @field_validator("mask_ratio")
    @classmethod
    def _check_ratio(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"need 0 <= low < high <= 1, got ({lo}, {hi})")
        return value


class OptimConfig(_Section):
    lr: float = Field(SCHED.lr, gt=0, description="base lr at batch 256, scaled linearly")
    min_lr: float = Field(SCHED.min_lr, ge=0, description="end of the cosine decay")
    warmup_epochs: int = Field(SCHED.warmup_epochs, ge=0, description="linear lr warm-up (paper: 10)")
    warmup_includes_end: bool = Field(
        SCHED.warmup_includes_end, description="the warm-up's last step is at the base lr, as "
        "the reference's cosine_scheduler; false: one step short (the quickstart's setting)")
    weight_decay: float = Field(SCHED.weight_decay, ge=0, description="start of the cosine wd schedule")
    weight_decay_end: float = Field(SCHED.weight_decay_end, ge=0, description="end of the cosine wd schedule")
    clip_grad: float = Field(3.0, ge=0, description="per-parameter grad norm cap; 0 = off")
    freeze_last_layer: int = Field(1, ge=0, description="epochs with the last layer frozen")
    momentum_teacher: float = Field(
        SCHED.momentum_teacher, ge=0, lt=1, description="EMA base: 0.996 at batch 1024, 0.9995 at 256"
    )
    lr_scaling: Literal["linear", "sqrt"] = Field(
        SCHED.lr_scaling, description="linear: lr x batch / 256 (the paper); sqrt: lr x "
        "sqrt(batch / 1024), dinov2's sqrt_wrt_1024 (lr is then the lr at batch 1024)")
    layer_decay: float = Field(
        RECIPE.layer_decay, gt=0, le=1, description="layer-wise lr decay: block i of L gets "
        "lr x decay^(L - i) (dinov2: 0.9); 1: none; needs a ViT")
    patch_embed_lr_mult: float = Field(
        RECIPE.patch_embed_lr_mult, gt=0, le=1, description="lr multiplier of the patch "
        "embedding (dinov2: 0.2); 1: none")


class GramConfig(_Section):
    """DINOv3's Gram anchoring (Siméoni et al. 2025, Sec. 4.2): off unless weight > 0."""

    weight: float = Field(RECIPE.gram_weight, ge=0, description="loss weight after the ramp (dinov3: 2.0); 0: off")
    start_step: int = Field(
        RECIPE.gram_start_step, ge=0, description="first step with anchoring; the teacher "
        "is snapshotted then (dinov3: after its main phase, 1,000,000 steps)")
    ramp_steps: int = Field(RECIPE.gram_ramp_steps, ge=0, description="half-cosine rise of the weight (dinov3: 1,000)")
    refresh_every_steps: int = Field(
        RECIPE.gram_refresh_every_steps, ge=0, description="re-snapshot the teacher at "
        "every multiple of this after the start (dinov3: 10,000); 0: never")
    max_refreshes: int | None = Field(RECIPE.gram_max_refreshes, ge=0, description="cap on re-snapshots (dinov3: 3); None: no cap")
    img_level: bool = Field(RECIPE.gram_img_level, description="one Gram matrix per crop (dinov3's anchoring); false: over the batch")
    remove_neg: bool = Field(RECIPE.gram_remove_neg, description="clamp negative similarities to 0 (dinov3: false)")


class DistillConfig(_Section):
    """Distillation from a large frozen teacher (DINOv2, Oquab et al. 2024, Sec. 5): the
    student is ``model.*``, trained on the teacher's features or DINO targets; its EMA copy
    is the run's teacher for k-NN and export. Off while ``teacher`` is empty."""

    teacher: str = Field(
        "", description="the frozen teacher: an exported .safetensors, a run folder or "
        "checkpoint, a reference DINO .pth or Meta's DINOv2/v3 .pth (a path or URL); its "
        "weights are not saved with the run, their SHA-256 is; empty: no distillation")
    required: bool = Field(
        False, description="set by the distillation presets: an empty teacher stops the run "
        "before it starts, instead of quietly pretraining the student with DINO")
    objective: Literal["feature", "dino", "both"] = Field(
        "feature", description="feature: the teacher's CLS and patch features (any teacher "
        "file); dino: its DINO head's targets (a training checkpoint: the head is in it); both")
    feature_loss: Literal["cosine", "smooth_l1"] = Field(
        "cosine", description="per token, against the teacher's layer-normalised feature: "
        "cosine ignores the scale; smooth_l1 (beta 1) also fits it")
    cls_weight: float = Field(1.0, ge=0, description="weight of the CLS feature term; 0: none")
    patch_weight: float = Field(
        1.0, ge=0, description="weight of the patch feature term (the teacher's grid resampled "
        "to the student's); 0: none, for a teacher whose patches are not worth copying")
    dino_weight: float = Field(1.0, ge=0, description="weight of the DINO term (objective dino or both)")
    projector_hidden_dim: int = Field(
        0, ge=0, description="the projectors from the student's width to the teacher's: 0, "
        "one linear layer (the student must hold the teacher's features up to a linear map); "
        "> 0, a GELU MLP this wide")
    students: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="more students beside model.*, fed by the same "
        "teacher forward (DINOv3's multi-distillation): a name (a folder name) -> model.* "
        "overrides, e.g. {vit_t: {arch: vit_tiny}}; each has its own optimizer, EMA copy, "
        "checkpoint section, students/<name>/teacher_backbone.safetensors and <name>/* "
        "metrics; empty: the one student model.*")

    @field_validator("students")
    @classmethod
    def _student_names(cls, students: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each name is a folder of the run (``students/<name>/``), unique even where a
        filesystem ignores case; each student's overrides are ``model.*`` settings."""
        seen: dict[str, str] = {}
        for name, overrides in students.items():
            if not RUN_NAME.fullmatch(name) or len(name) > RUN_NAME_MAX:
                raise ValueError(f"{name!r} is not a folder name: letters, digits, '_', '.' "
                                 f"and '-' only, starting with a letter or digit, at most "
                                 f"{RUN_NAME_MAX} characters")
            if name.lower() in seen:
                raise ValueError(f"{seen[name.lower()]!r} and {name!r} name one folder "
                                 "(students/<name>/) where case is ignored; rename one")
            seen[name.lower()] = name
            if not isinstance(overrides, dict):
                raise ValueError(f"{name}: a mapping of model.* settings, got {overrides!r}")
            unknown = sorted(set(overrides) - set(ModelConfig.model_fields))
            if unknown:
                raise ValueError(f"{name}.{unknown[0]}: not a model.* setting; allowed: "
                                 f"{', '.join(ModelConfig.model_fields)}")
        return students

    @model_validator(mode="after")
    def _weights(self) -> DistillConfig:
        if self.objective != "dino" and self.cls_weight + self.patch_weight == 0:
            raise ValueError(f"train.distill.objective={self.objective} with "
                             "train.distill.cls_weight=0 and train.distill.patch_weight=0 "
                             "leaves no feature term; raise one, or use objective=dino")
        return self

    @property
    def on(self) -> bool:
        """A run that distils (or must: ``required``); every rule of distillation applies."""
        return bool(self.teacher) or self.required

    @property
    def with_dino(self) -> bool:
        return self.objective in ("dino", "both")


def schedule_keys() -> tuple[str, ...]:
    """The numeric settings that feed ``ScheduleSpec`` (``service.config.schedule_spec``),
    as dotted keys: the ones a run's ``train.value_changes`` may change mid-run."""
    numeric = {f.name for f in fields(ScheduleSpec)
               if isinstance(f.default, int | float) and not isinstance(f.default, bool)}
    return tuple(f"{section}.{name}" for section, model in (("optim", OptimConfig),
                                                            ("loss", LossConfig))
                 for name in model.model_fields if name in numeric)


def _number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"a number, got {value!r}")
    return value


class ValueChange(_Section):
    """From global step ``step`` on, the schedules are those of the config with ``values``
    set (and every earlier change), indexed by the global step as from step 0."""

    step: int = Field(ge=1, description="the first global step with the new values")
    values: dict[str, Annotated[int | float, BeforeValidator(_number)]] = Field(
        min_length=1, description="dotted schedule settings, e.g. loss.teacher_temp: 0.05")

    @field_validator("values")
    @classmethod
    def _schedule_keys(cls, values: dict[str, float | int]) -> dict[str, float | int]:
        allowed = schedule_keys()
        bad = sorted(k for k in values if k not in allowed)
        if bad:
            raise ValueError(f"{', '.join(bad)} cannot change mid-run (not a schedule "
                             f"setting); allowed: {', '.join(allowed)}")
        return values


class TrainConfig(_Section):
    epochs: int = Field(100, ge=1, description="paper: 100 (ViT-S) to 800")
    batch_size: int = Field(256, ge=1, description="global batch over all workers")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    seed: int = Field(0, description="torch/numpy seed; each worker adds its rank")
    checkpoint_every_epochs: int = Field(1, ge=0, description="0 disables epoch checkpoints")
    checkpoint_every_steps: int = Field(0, ge=0, description="also every N steps; 0 = off")
    keep_last: int = Field(3, ge=1, description="checkpoints kept in storage")
    log_every_steps: int = Field(10, ge=1, description="metrics and progress line period")
    max_steps: int | None = Field(None, ge=1, description="stop early (tests, smoke runs)")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the backbones: auto = on GPU (minutes to compile on CPU)"
    )
    packed_crops: Literal["off", "sdpa", "flex"] = Field(
        "off", description="one backbone call for all crops, packed with per-crop attention "
        "masks (SDPA everywhere; FlexAttention on CUDA): same numerics, fewer small matmuls")
    fused_head_loss: bool = Field(
        False, description="the head's last layer, softmax and cross-entropy chunked over "
        "K: the student's B x crops x K scores are never held (less memory; same loss)")
    activation_checkpointing: bool = Field(
        False, description="recompute the student's blocks in the backward pass: less "
        "memory for large batches or /8 models, ~30% more compute")
    defer_nonfinite_check: Literal["auto"] | bool = Field(
        "auto", description="auto = on GPU: no host sync per step; a NaN step is a no-op, "
        "noticed at the next log step"
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="stop: raise and keep the last checkpoint; skip: drop the step"
    )
    max_skipped_steps: int = Field(10, ge=0, description="with skip: give up after this many")
    resume: str | None = Field(None, description="checkpoint URI to start from")
    checkpoint_upload: Literal["background", "sync"] = Field(
        "background", description="background: rank 0 writes the state to local disk and "
        "training goes on while it uploads to object storage (one upload in flight; a local "
        "storage.root is always sync); sync: the step waits")
    preemption_grace_s: float = Field(
        30.0, gt=0, description="time from a stop notice (SIGTERM to a worker, Ray's drain "
        "of a node, `dino jobs stop`) to the end of the run's last checkpoint; Kubernetes' "
        "default is 30 s (terminationGracePeriodSeconds)")
    stop_check_every_steps: int = Field(
        5, ge=1, description="steps between looks for a drain notice or a stop request "
        "(each look is a barrier of a few ms); a SIGTERM is seen at the next step")
    init_from: str | None = Field(None, description="weights to start a new run from: a reference checkpoint.pth / hub backbone .pth, our checkpoint or exported .safetensors; a fresh schedule, unlike train.resume")
    register_model: str | None = Field(
        None, description="register the run's backbone model (its MLflow artifact `backbone`) "
        "in the Model Registry under this name, a new version each time the run ends; None: "
        "logged, not registered (needs tracking.enabled)")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    value_changes: list[ValueChange] = Field(
        default_factory=list, description="schedule settings changed at global steps (a "
        "population-based sweep's exploits, replayed by `dino train --replay`): "
        "[{step: 40, values: {loss.teacher_temp: 0.05}}]; empty: none")

    @field_validator("register_model")
    @classmethod
    def _model_name(cls, name: str | None) -> str | None:
        """MLflow's own rule for registered names, checked before the run rather than when
        it ends (the registry refuses the name only after the whole run has trained)."""
        if name is None:
            return None
        if not name.strip() or any(c in name for c in "/:") or name.strip(".") == "":
            raise ValueError(f"a registered model name: not empty, not only dots, no '/' or ':', "
                             f"got {name!r}")
        return name

    @field_validator("value_changes")
    @classmethod
    def _increasing(cls, changes: list[ValueChange]) -> list[ValueChange]:
        steps = [c.step for c in changes]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must increase strictly, got {steps}")
        return changes


class EvalConfig(_Section):
    knn_every_epochs: int = Field(0, ge=0, description="k-NN on the labeled split; 0 = off")
    train_path: str = Field("procedural", description="labeled folder/URL or 'procedural'")
    val_path: str = Field("procedural", description="labeled folder/URL or 'procedural'")
    procedural_train_size: int = Field(1200, ge=1, description="labeled train images")
    procedural_val_size: int = Field(600, ge=1, description="labeled val images")
    image_size: int = Field(224, ge=8, description="Resize + CenterCrop side")
    knn_k: int = Field(20, ge=1, description="k of the reported k-NN (paper: 20)")
    knn_temperature: float = Field(0.07, gt=0, description="T of the weighted vote (0.07)")
    batch_size: int = Field(128, ge=1, description="feature extraction batch")

    @property
    def train_source(self) -> DataSource:
        return parse_source(self.train_path)

    @property
    def val_source(self) -> DataSource:
        return parse_source(self.val_path)


class StorageConfig(_Section):
    root: str = Field(
        "runs", description="checkpoints root: local path or fsspec URL (s3://, gs://)"
    )
    retry_seconds: float | None = Field(
        None, gt=0, description="how long storage may stay unreachable before a call gives up; "
        "None: DINO_STORAGE_RETRY_SECONDS, else 300 s (rides out a storage restart)")
    spool_dir: str | None = Field(
        None, description="local folder where uploads wait and stay if they fail; None: "
        "DINO_STORAGE_SPOOL_DIR, else <tmp>/dino-spool")
    create_bucket: bool = Field(
        False, description="make the bucket of an s3:// or gs:// root if it is missing; off, "
        "a missing bucket stops the run before it starts: a typo in the name would otherwise "
        "train into a new bucket nobody looks in")

    @field_validator("root")
    @classmethod
    def _check_root(cls, root: str) -> str:
        # a field validator, so the error names storage.root, not just the section
        scheme = url_scheme(root)
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(
                f"unknown storage scheme {scheme!r} in {root!r}; allowed: "
                f"a local path or {', '.join(s + '://' for s in STORAGE_SCHEMES)}"
            )
        return root


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow URI; default sqlite under storage.root")
    experiment: str = Field("dino", description="MLflow experiment name")
    enabled: bool = Field(True, description="log to MLflow at all")
    system_metrics: bool = Field(
        True, description="rank 0 samples CPU, memory, disk, network and GPU (nvidia-ml-py) "
        "into the run as system/* metrics (MLflow's monitor), plus one last sample at the end")
    system_metrics_interval_s: float = Field(
        10.0, ge=1, description="seconds between samples (MLflow's default): ~6 small requests "
        "a minute; a run shorter than this still gets its end sample")


class RayConfig(_Section):
    address: str | None = Field(None, description="None: start a local Ray; 'auto' or host:port")
    num_workers: int | tuple[int, int] = Field(
        1, description="data-parallel training workers; a range `2-4` or `[2, 4]` is elastic: "
        "Ray starts with what the cluster has (at least the minimum) and resizes the group as "
        "nodes come and go; the global batch and the schedules stay as configured")
    elastic_resize_interval_s: float = Field(
        60.0, gt=0, description="elastic runs: how often Ray looks for room to grow the group")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    max_failures: int = Field(0, ge=-1, description="group restarts on worker failure (-1: inf)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    verbose: bool = Field(
        False, description="Ray's own INFO lines (a line per report, start-up banners); "
        "`dino -v` turns them on")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        """``2``, ``"2-4"``, ``[2, 4]`` or ``(2, 4)``; a range of one size is that size."""
        if isinstance(value, str) and "-" in value:
            value = value.split("-", 1)
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"a worker range is [min, max], got {list(value)}")
            low, high = (int(v) for v in value)
            if not 1 <= low <= high:
                raise ValueError(f"a worker range needs 1 <= min <= max, got {low}-{high}")
            return low if low == high else (low, high)
        if isinstance(value, str):
            value = int(value)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"at least 1 worker, got {value}")
        return value

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


class DrillConfig(_Section):
    """Rehearsals of failures on a real run; nothing here is set unless a user sets it."""

    nonfinite_steps: list[int] = Field(
        default_factory=list, description="feed NaN crops to the step at these global steps, "
        "so that a real non-finite loss goes through the real step (to rehearse "
        "train.on_nonfinite); empty: no drill")

    @field_validator("nonfinite_steps")
    @classmethod
    def _positive(cls, steps: list[int]) -> list[int]:
        if any(s < 1 for s in steps):
            raise ValueError(f"global steps start at 1, got {sorted(steps)}")
        return steps


RUN_NAME_MAX = 100  # a folder name (most filesystems: 255 bytes), with room for sweep suffixes
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_distill(cfg: DinoConfig) -> None:
    """Distillation runs its own objective on a plain student: the DINOv2 recipe's terms,
    the packed multi-crop call and the fused head loss are not wired to it (``init_from``
    starts its student's backbone: ``apply_init_backbone``)."""
    for name, value, off in (("loss.ibot_weight", cfg.loss.ibot_weight, 0.0),
                             ("loss.koleo_weight", cfg.loss.koleo_weight, 0.0),
                             ("gram.weight", cfg.gram.weight, 0.0),
                             ("train.packed_crops", cfg.train.packed_crops, "off"),
                             ("train.fused_head_loss", cfg.train.fused_head_loss, False)):
        if value != off:
            raise ValueError(f"{name}={value} with train.distill.teacher: distillation has "
                             f"its own objective (train.distill.*) and does not use it; set "
                             f"{name}={off}")


def _check_resnet(cfg: DinoConfig, arch: str) -> None:
    """The recipe's parts that need patch tokens or blocks are off for a ResNet-50."""
    if cfg.model.arch != "resnet50":
        return
    for name, value, off in (("loss.ibot_weight", cfg.loss.ibot_weight, 0.0),
                             ("gram.weight", cfg.gram.weight, 0.0),
                             ("optim.layer_decay", cfg.optim.layer_decay, 1.0)):
        if value != off:
            raise ValueError(f"{name}={value:g} needs a ViT ({arch}=resnet50 has no patch "
                             f"tokens or blocks); use {off:g}")


def student_model(model: ModelConfig, overrides: dict[str, Any], name: str) -> ModelConfig:
    """An extra student's ``model.*``: the run's, with ``train.distill.students.<name>``'s
    overrides (a dinov2/dinov3 arch brings its own patch size unless one is given).

    Raises:
        ValueError: a bad value, naming ``train.distill.students.<name>.<key>``.
    """
    base = model.model_dump()
    if str(overrides.get("arch", "")).startswith("dinov") and "patch_size" not in overrides:
        base["patch_size"] = None
    try:
        return ModelConfig.model_validate({**base, **overrides})
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        got = f" (got {e['input']!r})" if e["type"] != "value_error" else ""
        raise ValueError(f"train.distill.students.{name}{'.' + where if where else ''}: "
                         f"{e['msg'].removeprefix('Value error, ')}{got}") from None


class DinoConfig(_Section):
    run_name: str = Field("dino", description="same name = resume; the run's folder name")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    aug: AugConfig = Field(default_factory=AugConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    gram: GramConfig = Field(default_factory=GramConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    drill: DrillConfig = Field(default_factory=DrillConfig)

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, name: str) -> str:
        """The run's folder under ``storage.root``: a name the OS refuses ('File name too
        long') would fail only after the run started."""
        if len(name) > RUN_NAME_MAX:
            raise ValueError(f"at most {RUN_NAME_MAX} characters, got {len(name)}")
        if not RUN_NAME.fullmatch(name):
            raise ValueError("letters, digits, '_', '.' and '-' only, starting with a letter "
                             f"or digit (ASCII), got {name!r}")
        return name

    @model_validator(mode="after")
    def _check(self) -> DinoConfig:
        _check_resnet(self, "model.arch")
        if self.train.distill.on:
            _check_distill(self)
        if self.train.register_model and not self.tracking.enabled:
            raise ValueError(f"train.register_model={self.train.register_model} registers in "
                             "MLflow's Model Registry: it needs tracking.enabled=true")
        if self.train.distill.students and not self.train.distill.on:
            raise ValueError(f"train.distill.students={sorted(self.train.distill.students)} "
                             "needs a teacher: set train.distill.teacher, or leave the "
                             "students out")
        for name, student in self.student_configs().items():  # each model.* validates
            _check_resnet(student, f"train.distill.students.{name}.arch")
        batch, r = self.train.batch_size, self.ray
        for workers in range(r.min_workers, r.max_workers + 1):
            if not batch % workers:
                continue
            below, above = batch // workers * workers, (batch // workers + 1) * workers
            nearest = f"{below} or {above}" if below else f"{above}"
            if r.elastic:
                bad = [w for w in range(r.min_workers, r.max_workers + 1) if batch % w]
                raise ValueError(
                    f"train.batch_size ({batch}) must be divisible by every size of "
                    f"ray.num_workers={r.min_workers}-{r.max_workers}, the per-worker batch "
                    f"being global / world size; {bad} do not divide it")
            raise ValueError(
                f"train.batch_size ({batch}) must be divisible by ray.num_workers ({workers}); "
                f"nearest allowed: {nearest}"
            )
        return self

    def student_configs(self) -> dict[str, DinoConfig]:
        """The extra students of distillation (``train.distill.students``), each as a run
        config of its own: this one with the student's ``model.*`` and no extra students
        (what its exported backbone file records)."""
        d = self.train.distill
        alone = self.train.model_copy(update={"distill": d.model_copy(update={"students": {}})})
        return {name: self.model_copy(update={"model": student_model(self.model, o, name),
                                              "train": alone})
                for name, o in d.students.items()}


