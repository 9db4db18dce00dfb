"""DINO training-step throughput: the reference semantics vs. this project's step.

Prints one JSON line per measurement. The baseline, ``reference``, re-creates the reference
step with public APIs (see ``bench/reference_step.py``); each following rung adds one lever,
so the gain of every lever is the ratio of two neighbouring lines:

    reference -> +sdpa -> +bf16 (CUDA) -> +fused_adamw -> +foreach -> +dino_loss -> +no_sync

then ``dino_core`` runs the project's real ``dino_core.train_step`` with every lever on, and
``dino_core+compile`` adds ``torch.compile`` of both backbones (``--compile``).

How the variants are timed (``bench/fair.py``): every variant is built first, warmed up with
the same number of steps (``--warmup``, plus 10 for all of them when one is compiled), then
the variants take turns window by window, round-robin with a rotating start (round r starts
with variant r mod n), ``--windows`` timed windows of ``--steps`` steps each. A busy moment of
the machine or a drift of the GPU's clocks then lands on every variant alike, not on
whichever ran at that time. Each line has images/s and ms per step as the median over the
windows with their spread (``*_spread`` = [min, max]), peak GPU memory (the most the device
held during the variant's windows, less what the other variants keep resident: what the
variant alone would hold), achieved TFLOP/s at the median (FLOPs counted once with
``FlopCounterMode``), ``ratio`` = median images/s over the first variant's median (the
reference by default; every variant does the same step on the same crops), and
``ratio_spread``: the range of the per-round ratios (both windows in the same round).

``--check`` prints the numerics: the reference math vs. ours in fp32 (loss to 1e-3
relative) and the fast path (bf16, compiled if asked) vs. the plain fp32 path (loss and
gradients within bf16 tolerance). ``--e2e N`` writes N JPEGs and measures the whole pipeline
(decode in DataLoader workers -> batched multi-crop on the device -> step) against the
synthetic-crop rate of the same variant (``dino_core``, or ``dino_core+compile`` with
``--compile``) at the same batch: the same steps, the data added. Its windows run back to
back, not between the ladder's (a loader would fill its queue while paused, which flatters
the next window); they are printed as median and spread too.

Usage:
    python bench/step.py --setting small                      # CPU, about two minutes
    python bench/step.py --device cuda --setting paper --batch 64 128 --compile --check \
        --e2e 2048                                            # one GPU, a few minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fair import fields, order, paired_ratios, rates  # noqa: E402
from reference_step import Levers, LeverStep, set_fused_attention  # noqa: E402

from dino_core import (  # noqa: E402
    DINOLoss,
    NetworkSpec,
    StepConfig,
    build_networks,
    build_optimizer,
    ema_parameter_lists,
    train_step,
)
from dino_core.distill import (  # noqa: E402
    DistillObjective,
    DistillStudent,
    FrozenTeacher,
    train_step_distill,
)
from dino_core.distill.student import ema_copy  # noqa: E402
from dino_core.losses.dino_chunked import chunked_dino_loss  # noqa: E402
from dino_core.losses.feature_distill import FeatureDistillLoss  # noqa: E402
from dino_core.masking import MaskSampler  # noqa: E402
from dino_core.models import build_backbone  # noqa: E402
from dino_core.models import compile_backbone as compile_backbone_  # noqa: E402
from dino_core.recipe import GramAnchor, RecipeLoss  # noqa: E402
from dino_core.specs import RecipeSpec  # noqa: E402
from dino_core.step_recipe import train_step_recipe  # noqa: E402


@dataclass(frozen=True)
class Setting:
    arch: str
    patch: int
    depth: int | None
    global_size: int
    local_size: int
    n_local: int
    out_dim: int
    hidden: int
    bottleneck: int


SETTINGS = {
    # the paper's ViT-S/16, 2 x 224 + 10 x 96, K = 65536
    "paper": Setting("vit_small", 16, None, 224, 96, 10, 65536, 2048, 256),
    # ViT-B/16 and ViT-S/8 at the paper's crops (the extra rows)
    "paper_b16": Setting("vit_base", 16, None, 224, 96, 10, 65536, 2048, 256),
    "paper_s8": Setting("vit_small", 8, None, 224, 96, 10, 65536, 2048, 256),
    # dinov2's ViT-S/14 at the dinov2 paper's crops, 2 x 224 + 8 x 98 (the dinov2_vits14 preset)
    "paper_s14": Setting("dinov2_vits14", 14, None, 224, 98, 8, 65536, 2048, 256),
    # the quickstart preset's model and crops
    "small": Setting("vit_tiny", 8, 4, 32, 16, 4, 256, 512, 128),
}
LADDER = [
    ("reference", Levers()),
    ("+sdpa", Levers(sdpa=True)),
    ("+bf16", Levers(sdpa=True, bf16=True)),
    ("+fused_adamw", Levers(sdpa=True, bf16=True, fused_adamw=True)),
    ("+foreach", Levers(sdpa=True, bf16=True, fused_adamw=True, foreach=True)),
    ("+dino_loss", Levers(sdpa=True, bf16=True, fused_adamw=True, foreach=True, dino_loss=True)),
    ("+no_sync", Levers(True, True, True, True, True, True)),
]
VALUES = {"lr": 1e-4, "weight_decay": 0.04, "momentum": 0.996, "teacher_temp": 0.04}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def networks(s: Setting, drop_path: float = 0.1) -> tuple:
    torch.manual_seed(0)
    spec = NetworkSpec(arch=s.arch, patch_size=s.patch, img_size=s.global_size, depth=s.depth,
                       drop_path_rate=drop_path, out_dim=s.out_dim, head_hidden_dim=s.hidden,
                       head_bottleneck_dim=s.bottleneck)
    return build_networks(spec)


def synthetic_crops(s: Setting, batch: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sizes = [s.global_size] * 2 + [s.local_size] * s.n_local
    return [torch.randn(batch, 3, n, n, generator=g).to(device) for n in sizes]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# the project's step plus levers: ``dino_core+<option>[+<option>...]``
# the recipe's parts, one option each, at dinov2's ssl_default_config values: iBOT (shared
# head, weight 1, masks 0.5 / 0.1-0.5 drawn on the host every step, as the loop does), KoLeo
# 0.1, the lr groups (layer decay 0.9, patch embedding x 0.2), Sinkhorn-Knopp centering (3
# iterations) and DINOv3's Gram anchoring (weight 2 from the first step, the snapshot taken
# then and never refreshed); ``+dinov2`` is dinov2's default recipe: iBOT + KoLeo + lr groups
RECIPE_PARTS: dict[str, dict[str, Any]] = {
    "ibot": {"ibot_weight": 1.0},
    "koleo": {"koleo_weight": 0.1},
    "lrgroups": {"layer_decay": 0.9, "patch_embed_lr_mult": 0.2},
    "sk": {"centering": "sinkhorn_knopp"},
    "gram": {"gram_weight": 2.0},
}
RECIPE_PARTS["dinov2"] = {**RECIPE_PARTS["ibot"], **RECIPE_PARTS["koleo"],
                          **RECIPE_PARTS["lrgroups"]}
OPTIONS = ("compile", "cudagraphs", "packed", "packed_sdpa", "chunked", "ckpt", "fp8",
           *RECIPE_PARTS, "distill")
# ``+distill``: the setting's student learns a frozen teacher one size up, same patch and
# depth (the ViT-B teacher for the paper's ViT-S student), through feature
# distillation (CLS and patch terms, linear projectors, the student's EMA copy kept): the
# teacher reads the global crops, the student all crops, as the service's step does
DISTILL_TEACHER = {"vit_tiny": "vit_small", "vit_small": "vit_base", "vit_base": "vit_large",
                   "dinov2_vits14": "dinov2_vitb14"}


def recipe_of(options: set[str]) -> RecipeSpec | None:
    """The ``RecipeSpec`` of the recipe parts among ``options``; None for none."""
    parts = [RECIPE_PARTS[o] for o in sorted(options) if o in RECIPE_PARTS]
    return RecipeSpec(**{k: v for part in parts for k, v in part.items()}) if parts else None


class ProjectStep:
    """``dino_core.train_step`` with the project's settings: bf16 on CUDA, fused AdamW,
    foreach clipping and EMA, deferred non-finite check; plus the levers named in
    ``options``: compiled backbone blocks (``compile``; ``cudagraphs``: mode
    reduce-overhead), one packed backbone call for all crops (``packed``: FlexAttention on
    CUDA; ``packed_sdpa``), the chunked head-and-loss (``chunked``), activation checkpointing
    of the student (``ckpt``), torchao float8 matmuls in the student's blocks (``fp8``)."""

    def __init__(self, student, teacher, out_dim: int, device: torch.device,
                 options: set[str] | bool = frozenset(), setting: Setting | None = None) -> None:
        if isinstance(options, bool):
            options = {"compile"} if options else set()
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; choose from {OPTIONS}")
        if "packed" in options or "packed_sdpa" in options:
            from dino_core.models.packed import PackedMultiCropWrapper

            mode = "sdpa" if "packed_sdpa" in options else "auto"
            student = PackedMultiCropWrapper(student.backbone, student.head, mode)
            teacher = PackedMultiCropWrapper(teacher.backbone, teacher.head, mode)
        set_fused_attention(student, True)
        set_fused_attention(teacher, True)
        if "ckpt" in options:
            student.backbone.set_grad_checkpointing(True)
        if "fp8" in options:
            from torchao.float8 import convert_to_float8_training  # not a dependency

            convert_to_float8_training(student.backbone.blocks)
        if "compile" in options or "cudagraphs" in options:
            mode = "reduce-overhead" if "cudagraphs" in options else None
            compile_backbone_(student.backbone, mode)
            compile_backbone_(teacher.backbone, mode)
        self.recipe: RecipeLoss | None = None
        self.gram: GramAnchor | None = None
        self.loss_fn = DINOLoss(out_dim).to(device)
        amp = torch.bfloat16 if device.type == "cuda" else None
        self.cfg = StepConfig(autocast_dtype=amp, defer_nonfinite_check=True,
                              fused_head_loss="chunked" in options)
        self.spec = spec = recipe_of(set(options))
        self.masks: MaskSampler | None = None  # made at the first step: the grid
        self.n_steps = 0
        if spec is not None and spec.masked:  # the builder's mask token, zeros as dinov2's
            for m in (student, teacher):
                m.mask_token = torch.nn.Parameter(torch.zeros(1, student.backbone.embed_dim,
                                                              device=device))
            teacher.mask_token.requires_grad = False
        if spec is not None and spec.active:
            self.recipe = RecipeLoss(self.loss_fn, spec,
                                     fused_head_loss=self.cfg.fused_head_loss).to(device)
        if spec is not None and spec.gram_weight > 0:
            self.gram = GramAnchor(teacher.backbone, spec).to(device)
        decay = {} if spec is None else {"layer_decay": spec.layer_decay,
                                         "patch_embed_lr_mult": spec.patch_embed_lr_mult}
        self.distill: tuple[FrozenTeacher, DistillObjective] | None = None
        if "distill" in options:
            if setting is None or setting.arch not in DISTILL_TEACHER:
                raise ValueError("+distill needs a setting whose arch has a teacher one size "
                                 f"up: {sorted(DISTILL_TEACHER)}")
            torch.manual_seed(2)
            big = build_backbone(DISTILL_TEACHER[setting.arch], setting.patch,
                                 setting.global_size, depth=setting.depth)
            frozen = FrozenTeacher(big).to(device)
            student = DistillStudent(student.backbone, frozen.embed_dim).to(device)
            teacher = ema_copy(student)
            self.distill = frozen, DistillObjective(FeatureDistillLoss())
        self.student, self.teacher = student, teacher
        self.optimizer = build_optimizer(student, fused=True, **decay)
        self.ema = ema_parameter_lists(teacher, student)

    def loss(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward and loss alone, for the numerics check."""
        amp = self.cfg.autocast_dtype
        with torch.autocast(crops[0].device.type, dtype=amp, enabled=amp is not None):
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            if self.cfg.fused_head_loss:
                z, weight = self.student(crops, split_last_layer=True)
                loss = chunked_dino_loss(z, teacher_out, weight, self.loss_fn.center,
                                         VALUES["teacher_temp"], self.loss_fn.student_temp)
            else:
                loss = self.loss_fn(self.student(crops), teacher_out, VALUES["teacher_temp"], 2,
                                    update_center=False)
        return loss, teacher_out

    def __call__(self, crops: list[torch.Tensor]) -> None:
        if self.distill is not None:
            frozen, objective = self.distill
            train_step_distill(student=self.student, teacher=frozen, objective=objective,
                               optimizer=self.optimizer, crops=crops, values=VALUES, step=0,
                               cfg=self.cfg, ema_params=self.ema)
            return
        if self.recipe is not None and self.spec is not None:
            side = crops[0].shape[-1] // self.student.backbone.patch_embed.patch_size[0]
            n = 2 * crops[0].shape[0]
            if self.spec.masked and self.masks is None:
                self.masks = MaskSampler((side, side), 0, self.spec.mask_probability,
                                         self.spec.mask_ratio)
            masks = (self.masks(n) if self.masks is not None
                     else torch.zeros(n, side * side, dtype=torch.bool))
            # the step counts for the Gram snapshot (taken at the first, never refreshed)
            train_step_recipe(student=self.student, teacher=self.teacher, losses=self.recipe,
                              optimizer=self.optimizer, crops=crops, masks=masks,
                              values=VALUES, step=self.n_steps, freeze_last_layer=False,
                              ema_params=self.ema, cfg=self.cfg, gram=self.gram)
            self.n_steps += 1
            return
        train_step(student=self.student, teacher=self.teacher, loss_fn=self.loss_fn,
                   optimizer=self.optimizer, crops=crops, values=VALUES, step=0,
                   freeze_last_layer=False, ema_params=self.ema, cfg=self.cfg)


def count_flops(s: Setting, crops: list[torch.Tensor], device: torch.device) -> float:
    """FLOPs of one forward+backward of the student and forward of the teacher (fp32)."""
    from torch.utils.flop_counter import FlopCounterMode

    student, teacher = (m.to(device) for m in networks(s))
    step = LeverStep(student, teacher, ema_parameter_lists(teacher, student), s.out_dim,
                     Levers(sdpa=True, dino_loss=True), device)
    with FlopCounterMode(display=False) as fc:
        loss, _ = step.loss(crops)
        loss.backward()
    return float(fc.get_total_flops())


def window_seconds(step: Callable, crops: list[torch.Tensor], device: torch.device,
                   steps: int) -> float:
    """Seconds per step over one window of ``steps`` steps (the device synced at both
    ends); 0 for no steps."""
    if steps < 1:
        return 0.0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(crops)
    sync(device)
    return (time.perf_counter() - t0) / steps


def variant_names(names: str) -> list[str]:
    """``--variants`` checked: every name is a rung of the ladder or ``dino_core`` with
    known options (``dino_core+packed+chunked``); raises ValueError naming the others."""
    ladder = {n for n, _ in LADDER}
    bad = []
    for name in names.split(","):
        head, *opts = name.split("+") if name.startswith("dino_core") else (name, )
        if name not in ladder and (head != "dino_core" or set(opts) - set(OPTIONS)):
            bad.append(name)
    if bad:
        raise ValueError(f"unknown variants {bad}: choose from {[n for n, _ in LADDER]} or "
                         f"dino_core[+option...] with options {list(OPTIONS)}")
    return names.split(",")


def build_variant(name: str, levers: Levers | None, s: Setting, template: tuple,
                  device: torch.device) -> Callable:
    student, teacher = (copy.deepcopy(m).to(device) for m in template)
    if levers is None:
        return ProjectStep(student, teacher, s.out_dim, device, set(name.split("+")[1:]), s)
    if device.type != "cuda" and levers.bf16:
        levers = replace(levers, bf16=False)  # CPU rungs stay fp32, like the CPU default
    return LeverStep(student, teacher, ema_parameter_lists(teacher, student), s.out_dim,
                     levers, device)


def run_ladder(args, s: Setting, device: torch.device) -> dict[tuple[str, int], list[float]]:
    """Every variant at every batch size, taking turns window by window (see the module's
    docstring); returns the images/s of each window per (variant, batch)."""
    template = networks(s)
    variants: list[tuple[str, Levers | None]] = [
        (n, lv) for n, lv in LADDER if device.type == "cuda" or n != "+bf16"]
    variants.append(("dino_core", None))
    if args.compile:
        variants.append(("dino_core+compile", None))
    if args.variants:  # in the order given (the first is the ratios' base); any
        known = dict(variants)  # dino_core+<options> combination may be named
        variants = [(n, known.get(n)) for n in variant_names(args.variants)
                    if n in known or n.startswith("dino_core")]
    compiled = any("compile" in n or "cudagraphs" in n for n, _ in variants)
    warmup = args.warmup + (10 if compiled else 0)  # the same for every variant
    measured: dict[tuple[str, int], list[float]] = {}
    for batch in args.batch:
        for name, ips in ladder_at(args, s, device, variants, template, batch, warmup).items():
            measured[(name, batch)] = ips
    return measured


def ladder_at(args, s: Setting, device: torch.device, variants: list, template: tuple,
              batch: int, warmup: int) -> dict[str, list[float]]:
    """The variants at one batch size: built, warmed up, timed in turns, one line each;
    returns the images/s of each window per variant."""
    cuda = device.type == "cuda"
    crops = synthetic_crops(s, batch, device)
    flops = count_flops(s, crops, device)
    steps: dict[str, Callable] = {}
    resident: dict[str, int] = {}  # device memory each variant keeps between its turns

    def turn(name: str, n_steps: int) -> tuple[float, int]:
        """One window of ``name``: (seconds per step, its peak device memory alone)."""
        before = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sec = window_seconds(steps[name], crops, device, n_steps)
        if not cuda:
            return sec, 0
        resident[name] += torch.cuda.memory_allocated() - before
        others = sum(v for k, v in resident.items() if k != name)
        return sec, torch.cuda.max_memory_allocated() - others

    def failed(name: str, err: Exception) -> None:
        steps.pop(name, None)
        resident.pop(name, None)
        emit({"bench": "step", "variant": name, "batch": batch, "error": repr(err)[:300]})
        if cuda:
            torch.cuda.empty_cache()

    for name, levers in variants:
        try:
            before = torch.cuda.memory_allocated() if cuda else 0
            steps[name] = build_variant(name, levers, s, template, device)
            resident[name] = (torch.cuda.memory_allocated() - before) if cuda else 0
        except Exception as err:  # keep measuring the other variants
            failed(name, err)
    for name in list(steps):  # warm-up: the same number of steps for every variant
        try:
            turn(name, warmup)
        except Exception as err:
            failed(name, err)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    peak: dict[str, int] = dict.fromkeys(steps, 0)
    for r in range(args.windows):
        for name in order(list(steps), r):
            try:
                sec, mem = turn(name, args.steps)
            except Exception as err:  # an OOM or a failed compile costs its row only
                failed(name, err)
                continue
            seconds[name].append(sec)
            peak[name] = max(peak[name], mem)
    seconds = {name: secs for name, secs in seconds.items() if name in steps}
    base_name = variants[0][0]
    base = rates(batch, seconds[base_name]) if base_name in seconds else None
    out = {}
    for name, secs in seconds.items():
        ips = out[name] = rates(batch, secs)
        pairs = paired_ratios(ips, base) if base else None
        emit({"bench": "step", "setting": args.setting, "device": device_name(device),
              "variant": name, "batch": batch, **fields("img_per_s", ips, 1),
              **fields("step_ms", [x * 1e3 for x in secs], 2),
              "windows": len(secs), "steps_per_window": args.steps, "warmup_steps": warmup,
              "peak_mem_gib": round(peak[name] / 2**30, 2) if cuda else None,
              "tflops": round(flops / statistics.median(secs) / 1e12, 4),
              "ratio_base": base_name if base else None,
              "ratio": round(statistics.median(ips) / statistics.median(base), 3)
              if base else None,
              "ratio_spread": [round(min(pairs), 3), round(max(pairs), 3)] if pairs else None})
    steps.clear()
    if cuda:
        torch.cuda.empty_cache()
    return out


def loss_and_grads(step: LeverStep | ProjectStep,
                   crops: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    step.student.zero_grad(set_to_none=True)
    loss, _ = step.loss(crops)
    loss.backward()
    grads = [p.grad.float().flatten() for p in step.student.parameters() if p.grad is not None]
    return float(loss.detach()), torch.cat(grads)


def run_checks(args, s: Setting, device: torch.device) -> None:
    """fp32 reference math vs. ours; fast path vs. plain fp32 path."""
    template = networks(s, drop_path=0.0)
    crops = synthetic_crops(s, min(args.batch), device)

    def fresh(levers: Levers) -> LeverStep:
        st, te = (copy.deepcopy(m).to(device) for m in template)
        return LeverStep(st, te, ema_parameter_lists(te, st), s.out_dim, levers, device)

    def compare(name: str, a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor],
                loss_tol: float, grad_tol: float) -> None:
        loss_rel = abs(a[0] - b[0]) / abs(b[0])
        grad_rel = float((a[1] - b[1]).norm() / b[1].norm())
        emit({"check": name, "device": device_name(device), "loss": [a[0], b[0]],
              "loss_rel_diff": loss_rel, "grad_rel_err": grad_rel,
              "ok": loss_rel <= loss_tol and grad_rel <= grad_tol,
              "tolerance": {"loss": loss_tol, "grad": grad_tol}})

    fp32 = Levers(fused_adamw=True, foreach=True)
    ref32 = fresh(replace(fp32, bf16=False))
    ref32.amp_dtype, ref32.scaler = None, None  # the reference math in fp32
    plain = loss_and_grads(ref32, crops)
    ours32 = fresh(Levers(sdpa=True, dino_loss=True))
    ours32.amp_dtype, ours32.scaler = None, None
    compare("fp32_reference_vs_ours", loss_and_grads(ours32, crops), plain, 1e-3, 1e-3)
    st, te = (copy.deepcopy(m).to(device) for m in template)
    fast = ProjectStep(st, te, s.out_dim, device, args.compile)
    fast.cfg = StepConfig(autocast_dtype=torch.bfloat16, defer_nonfinite_check=True)
    compare("bf16_fast_vs_fp32_plain" + ("_compiled" if args.compile else ""),
            loss_and_grads(fast, crops), plain, 2e-2, 1e-1)
    # the new levers (packed crops, chunked head-and-loss): fp32 against our plain fp32,
    # then in bf16 against the plain fp32 at the 1e-3 on the loss
    for amp, tol in ((None, (1e-5, 1e-4)), (torch.bfloat16, (1e-3, 1e-1))):
        st, te = (copy.deepcopy(m).to(device) for m in template)
        levers = ProjectStep(st, te, s.out_dim, device, {"packed", "chunked"})
        levers.cfg = StepConfig(autocast_dtype=amp, defer_nonfinite_check=True,
                                fused_head_loss=True)
        compare(f"packed_chunked_{'bf16' if amp else 'fp32'}_vs_fp32_plain",
                loss_and_grads(levers, crops), loss_and_grads(ours32, crops), *tol)


def write_jpegs(n: int) -> tuple[str, float]:
    """``n`` 500x375 JPEGs in 10 class folders; returns (folder, seconds)."""
    import tempfile

    import numpy as np
    from PIL import Image

    root = tempfile.mkdtemp(prefix="dino-e2e-")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n):
        # smooth random colour fields with noise: JPEG sizes like photos (~60-120 kB at 500 px)
        low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (375, 500, 3))
        os.makedirs(f"{root}/c{i % 10}", exist_ok=True)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(f"{root}/c{i % 10}/{i}.jpg",
                                                                 quality=90)
    return root, time.perf_counter() - t0


def time_pipeline(args, s: Setting, device: torch.device, loader, crops_of,
                  variant: str) -> tuple[list[float], float]:
    """(images/s of each window of loader -> ``crops_of(batch)`` -> step, seconds to the
    first batches). ``--warmup`` steps first, then ``--windows`` windows of ``--steps``
    steps, back to back."""
    template = networks(s)
    st, te = (copy.deepcopy(m).to(device) for m in template)
    step = ProjectStep(st, te, s.out_dim, device, set(variant.split("+")[1:]))

    def batches():
        while True:
            yield from loader

    it = batches()
    started = time.perf_counter()
    for _ in range(3):
        next(it)
    first = time.perf_counter() - started
    batch = max(args.batch)
    compiled = "compile" in variant or "cudagraphs" in variant
    for _ in range(args.warmup + (10 if compiled else 0)):
        step(crops_of(next(it)))
    ips = []
    for _ in range(args.windows):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(crops_of(next(it)))
        sync(device)
        ips.append(batch * args.steps / (time.perf_counter() - t0))
    return ips, first


def run_e2e(args, s: Setting, device: torch.device, synthetic: list[float],
            variant: str) -> None:
    """Encoded JPEGs -> DataLoader decode -> batched multi-crop on the device -> step; with
    ``--e2e-packed`` also: the same JPEGs packed into shards -> the streaming reader (encoded
    bytes) -> decode on the device (nvjpeg on CUDA) -> crops of each full image -> step."""
    from dino_core.augment.batched import BatchedMultiCrop, ToCanvas
    from dino_core.augment.full import full_image_views
    from dino_core.data.collate import collate_multicrop
    from dino_core.data.folder import ImageFolder

    canvas = 256 if s.global_size >= 224 else 2 * s.global_size
    root, written = write_jpegs(args.e2e)
    batch = max(args.batch)
    workers = max(1, min(16, os.cpu_count() or 1) - 1)
    aug = BatchedMultiCrop(s.global_size, s.local_size, s.n_local)
    gen = torch.Generator().manual_seed(0)
    ds = ImageFolder(root, transform=ToCanvas(canvas), size_hint=canvas)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
        collate_fn=collate_multicrop, pin_memory=device.type == "cuda",
        persistent_workers=True, prefetch_factor=4)
    ips, first = time_pipeline(args, s, device, loader,
                               lambda b: aug(b[0].to(device, non_blocking=True), gen), variant)
    row = {"bench": "e2e", "setting": args.setting, "device": device_name(device),
           "images": args.e2e, "loader_workers": workers, "batch": batch, "variant": variant,
           **fields("synthetic_img_per_s", synthetic, 1), "jpeg_write_s": round(written, 1)}

    def ratio_vs_synthetic(ips: list[float]) -> float:
        return round(statistics.median(ips) / statistics.median(synthetic), 3)

    emit({**row, "source": "folder, canvas decoded on CPU", **fields("img_per_s", ips, 1),
          "ratio_vs_synthetic": ratio_vs_synthetic(ips), "first_batches_s": round(first, 1)})
    if not args.e2e_packed:
        return
    from service.data import collate_encoded, read_manifest
    from service.data.pack import pack
    from service.data.stream import ShardStream

    pack(root, root + "-packed", parallel=False)
    stream = ShardStream(read_manifest(root + "-packed"), None, None, raw=True)
    epochs = iter(range(10**6))

    def packed_batches():
        while True:
            stream.configure(epoch=next(epochs), rank=0, world=1, batch=batch, streams=workers)
            yield from torch.utils.data.DataLoader(
                stream, batch_size=batch, num_workers=workers, collate_fn=collate_encoded,
                prefetch_factor=4)

    side = max(canvas, 496 * s.local_size // 96)  # the service's full_image_side at paper sizes
    ips, first = time_pipeline(args, s, device, packed_batches(),
                               lambda b: full_image_views(aug, b[0], device, gen, side)[0],
                               variant)
    emit({**row, "source": "packed shards, decoded on the device, full-image crops",
          **fields("img_per_s", ips, 1), "ratio_vs_synthetic": ratio_vs_synthetic(ips),
          "first_batches_s": round(first, 1)})


def run_profile(args, s: Setting, device: torch.device, variant: str) -> None:
    """``torch.profiler`` over 3 steps of ``variant`` at each batch: the top kernels (ops on
    CPU) by self time per step, and how busy the device was (1 - the idle gaps)."""
    from torch.profiler import ProfilerActivity, profile

    template = networks(s)
    cuda = device.type == "cuda"
    for batch in args.batch:
        step = build_variant(variant, dict(LADDER).get(variant), s, template, device)
        crops = synthetic_crops(s, batch, device)
        for _ in range(args.warmup + (10 if "compile" in variant else 0)):
            step(crops)
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(3):
                step(crops)
            sync(device)
        wall = (time.perf_counter() - t0) / 3
        events = prof.key_averages()

        def self_us(e) -> float:
            if cuda:
                return float(getattr(e, "self_device_time_total", 0.0)
                             or getattr(e, "self_cuda_time_total", 0.0))
            return float(e.self_cpu_time_total)

        busy = sum(self_us(e) for e in events) / 3 / 1e6 if cuda else None
        top = sorted(events, key=self_us, reverse=True)[:12]
        emit({"bench": "profile", "variant": variant, "batch": batch,
              "device": device_name(device), "step_ms": round(wall * 1e3, 2),
              "device_busy_fraction": busy and round(min(busy / wall, 1.0), 3),
              "top": [{"name": e.key[:70], "ms_per_step": round(self_us(e) / 3 / 1e3, 3),
                       "calls_per_step": e.count // 3} for e in top]})
        del step


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} threads"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (unknown options or variant names exit with status 2)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    p.add_argument("--batch", type=int, nargs="+", default=[64])
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5,
                   help="timed windows per variant, taken in turns (median and spread)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd backbones")
    p.add_argument("--check", action="store_true", help="numerics of the fast path")
    p.add_argument("--e2e", type=int, default=0, help="JPEGs for the end-to-end rate")
    p.add_argument("--e2e-packed", action="store_true",
                   help="e2e also from packed shards with decode on the device")
    p.add_argument("--variants", default="", help="comma-separated subset of the variants")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    p.add_argument("--profile", default="", help="comma-separated variants to profile "
                   "(top kernels and device idle time), instead of timing the ladder")
    args = p.parse_args(argv)
    for names in (args.variants, args.profile):
        if names:
            try:
                variant_names(names)
            except ValueError as err:
                p.error(str(err))
    if args.windows < 1 or args.steps < 1:
        p.error("--windows and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    s = SETTINGS[args.setting]
    emit({"bench": "config", "setting": args.setting, **asdict(s), "batch": args.batch,
          "device": device_name(device), "torch": torch.__version__})
    if args.profile:
        for variant in args.profile.split(","):
            run_profile(args, s, device, variant)
        return
    if args.check:
        run_checks(args, s, device)
    measured = run_ladder(args, s, device)
    variant = "dino_core+compile" if args.compile else "dino_core"
    if args.e2e:
        synthetic = measured.get((variant, max(args.batch)))
        if synthetic is None:
            emit({"bench": "e2e", "variant": variant, "error": f"{variant} was not timed at "
                  f"batch {max(args.batch)}: no synthetic rate to compare with"})
        else:
            run_e2e(args, s, device, synthetic, variant)


if __name__ == "__main__":
    main()
