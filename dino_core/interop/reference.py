"""Files of the reference DINO code (facebookresearch/dino): read safely, and written.

Two formats are read:

* ``main_dino.py``'s ``checkpoint.pth``: ``{"student", "teacher", "optimizer", "epoch",
  "args", "dino_loss"[, "fp16_scaler"]}``; ``student`` and ``teacher`` are multi-crop
  wrapper state dicts (``backbone.*``, ``head.*``), the student's under DDP's ``module.``
  prefix (the teacher's too when the model has BatchNorm: main_dino wraps it in DDP then),
  ``args`` an ``argparse.Namespace``, ``dino_loss`` ``{"center": (1, out_dim)}``;
* the released backbone-only files (``dino_vits16_pretrain.pth``,
  ``dino_deitsmall16_pretrain.pth``, ``dino_resnet50_pretrain.pth``, ...): a flat backbone
  state dict.

Meta's DINOv2 and DINOv3 backbone files (``dinov2_vits14_pretrain.pth``,
``dinov3_vits16_pretrain_lvd1689m-*.pth``, ...) are read here too, with the same safety; their
key layout is ``dino_core.interop.meta``'s (``kind`` "dinov2" / "dinov3").

Reading never runs pickled code: ``torch.load(weights_only=True)`` with
``argparse.Namespace`` the one class allowed, so a file holding any other object is
refused. The model settings come from the tensors (width -> ``vit_tiny/small/base``, patch
size, depth, the position table's side), ``args`` only confirms them.

Written: a ``checkpoint.pth`` in main_dino's exact layout (no optimizer: ours is laid out
differently, and main_dino resumes without one), which the reference's ``eval_knn.py``,
``eval_linear.py`` and ``visualize_attention.py`` load through
``utils.load_pretrained_weights`` (``--checkpoint_key teacher``), and the flat backbone
format of the released files. The reference builds its ViTs with a 224 px position table,
so a table of another size is resampled to 224 px on the way out, by the reference formula:
at 224 px the reference then computes what this model computes; elsewhere it resamples
from the 224 px table.
"""

from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_core.interop import reference_keys as keys
from dino_core.interop.meta import family_meta, is_meta_layout, read_meta_state
from dino_core.models.backbone import build_backbone
from dino_core.models.position import reference_pos_embed

Tensor = torch.Tensor
REFERENCE_TABLE_PX = 224  # img_size of the reference vit_* constructors
MAIN_DINO_DEFAULTS: dict[str, Any] = {
    "arch": "vit_small", "patch_size": 16, "out_dim": 65536, "norm_last_layer": True,
    "momentum_teacher": 0.996, "use_bn_in_head": False, "warmup_teacher_temp": 0.04,
    "teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0, "use_fp16": True,
    "weight_decay": 0.04, "weight_decay_end": 0.4, "clip_grad": 3.0, "batch_size_per_gpu": 64,
    "epochs": 100, "freeze_last_layer": 1, "lr": 0.0005, "warmup_epochs": 10, "min_lr": 1e-6,
    "optimizer": "adamw", "drop_path_rate": 0.1, "global_crops_scale": (0.4, 1.0),
    "local_crops_number": 8, "local_crops_scale": (0.05, 0.4),
    "data_path": "/path/to/imagenet/train/", "output_dir": ".", "saveckp_freq": 20, "seed": 0,
    "num_workers": 10, "dist_url": "env://", "local_rank": 0, "rank": 0, "world_size": 1,
    "gpu": 0,
}  # fmt: skip  # main_dino.py's arguments, and what init_distributed_mode adds


@dataclass
class ReferenceWeights:
    """What a reference file holds, in our key names.

    ``meta``: ``build_backbone``'s ``arch``, ``patch_size``, ``depth``, ``img_size``;
    ``backbones``: ``teacher`` (always) and ``student`` (checkpoints) backbone state dicts;
    ``heads``: ``DINOHead`` state dicts of the same, when the file has them.
    """

    path: str
    # "checkpoint" (main_dino's), "backbone" (a released backbone file), "dinov2" / "dinov3"
    # (Meta's released backbone files)
    kind: str
    meta: dict[str, Any]
    backbones: dict[str, dict[str, Tensor]]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    center: Tensor | None = None
    epoch: int | None = None
    args: dict[str, Any] | None = None
    mask_token: Tensor | None = None  # Meta's files: iBOT's learned token (1, D), no backbone weight
    notes: list[str] = field(default_factory=list)  # what reading left out


def safe_load(path: str | Path) -> Any:
    """``torch.load`` of a file that may come from anywhere: tensors, plain containers and
    ``argparse.Namespace`` only; anything else is a ValueError naming the file and the
    global it wanted, raised before any of it is built."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            raise ValueError(
                f"{path}: refused to load: it holds a pickled {found.group(1)}, which is "
                "none of tensors, plain containers and argparse.Namespace (all a DINO "
                "checkpoint holds); nothing of it was run") from None
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        raise ValueError(f"{path} is not a torch file that loads with weights_only=True: "
                         f"{detail.group(1) if detail else text.splitlines()[0]}") from None
    except (RuntimeError, EOFError, KeyError) as err:
        # KeyError: a file whose first bytes are no torch magic number (e.g. text) fails in
        # torch's legacy reader with the number it read
        raise ValueError(f"{path} is not a readable torch file: {err!r}") from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def read_reference(path: str | Path) -> ReferenceWeights:
    """A main_dino ``checkpoint.pth`` or a released backbone file, in our key names."""
    obj = safe_load(path)
    where = str(path)
    backbones: dict[str, dict[str, Tensor]] = {}
    heads: dict[str, dict[str, Tensor]] = {}
    out = ReferenceWeights(where, "checkpoint", {}, backbones, heads)
    if isinstance(obj, dict) and ("teacher" in obj or "student" in obj):
        for which in ("teacher", "student"):
            if which not in obj:
                continue
            if not _is_tensor_dict(obj[which]):
                raise ValueError(f"{where}: {which!r} is not a state dict")
            try:
                backbone, head = keys.split_wrapper(obj[which])
            except ValueError as err:
                raise ValueError(f"{where}: {which!r}: {err}") from None
            backbones[which] = keys.backbone_to_ours(backbone)
            if head:
                heads[which] = keys.head_to_ours(head)
        loss = obj.get("dino_loss")
        out.center = loss.get("center") if isinstance(loss, dict) else None
        out.epoch = int(obj["epoch"]) if isinstance(obj.get("epoch"), int) else None
        args = obj.get("args")
        out.args = vars(args) if isinstance(args, argparse.Namespace) else (
            dict(args) if isinstance(args, dict) else None)
    elif _is_tensor_dict(obj):
        out.kind = "backbone"
        flat = {k.removeprefix("module."): v for k, v in obj.items()}
        if is_meta_layout(flat):
            return _read_meta(out, flat)
        if all(k.startswith(("backbone.", "head.")) for k in flat):  # a wrapper saved alone
            backbone, head = keys.split_wrapper(flat)
            heads.update({"teacher": keys.head_to_ours(head)} if head else {})
        else:
            backbone = flat
        backbones["teacher"] = keys.backbone_to_ours(backbone)
    else:
        top = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{where} is neither a main_dino checkpoint (teacher, student, ...) "
                         f"nor a backbone state dict: {top}")
    first = backbones.get("teacher") or next(iter(backbones.values()))
    try:
        out.meta = keys.backbone_meta(first)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    _check_args(out)
    return out


def _read_meta(out: ReferenceWeights, flat: dict[str, Tensor]) -> ReferenceWeights:
    try:
        m = read_meta_state(flat)
    except ValueError as err:
        raise ValueError(f"{out.path}: {err}") from None
    out.kind, out.meta, out.mask_token, out.notes = m.family, m.meta, m.mask_token, m.notes
    out.backbones["teacher"] = m.state
    return out


def _check_args(w: ReferenceWeights) -> None:
    """The file's ``args`` (if any) name the model its tensors are."""
    if not w.args or "arch" not in w.args:
        return
    arch = str(w.args["arch"]).replace("deit", "vit")
    if arch != w.meta["arch"]:
        raise ValueError(f"{w.path}: args.arch is {w.args['arch']!r} but the tensors are "
                         f"{keys.describe(w.meta)}; only vit_tiny/small/base and resnet50 "
                         "are supported")
    patch = w.args.get("patch_size")
    if arch != "resnet50" and patch is not None and int(patch) != w.meta["patch_size"]:
        raise ValueError(f"{w.path}: args.patch_size is {patch} but the tensors are "
                         f"{keys.describe(w.meta)}")


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """A fresh backbone of ``meta``; the reference interpolation, as the reference uses (and
    Meta's plain DINOv2 models; its register and DINOv3 models resize their own way)."""
    return build_backbone(meta["arch"], meta["patch_size"], meta["img_size"],
                          depth=meta["depth"], pos_embed_interpolation="reference")


def load_reference_backbone(path: str | Path, which: str = "teacher") -> nn.Module:
    """The ``teacher`` or ``student`` backbone of a reference file (backbone-only files: the
    teacher), or ``random``: the same architecture freshly initialised; in eval mode."""
    w = read_reference(path)
    model = build_from_meta(w.meta)
    if which != "random":
        if which not in w.backbones:
            raise ValueError(f"{path} holds the {' and '.join(w.backbones)} backbone, "
                             f"not {which!r}")
        model.load_state_dict(w.backbones[which], strict=True)
    return model.eval()


def _table_for_reference(backbone: dict[str, Tensor], table_px: int | None) -> dict[str, Tensor]:
    if table_px is None or "pos_embed" not in backbone:
        return backbone
    grid = table_px // int(backbone["patch_embed.proj.weight"].shape[-1])
    with torch.no_grad():
        pos = reference_pos_embed(backbone["pos_embed"].detach().float(), grid, grid)
    return {**backbone, "pos_embed": pos.to(backbone["pos_embed"].dtype)}


def _dino_v1_only(backbone: dict[str, Tensor]) -> None:
    """The reference code builds DINO v1's ViTs and the ResNet-50 only."""
    fam = family_meta(backbone)
    if fam is not None:
        raise ValueError(f"the reference DINO format holds DINO v1's ViTs and the ResNet-50, "
                         f"not Meta's {fam['arch']}: export it as .safetensors "
                         "(`dino export`, the default format), which timm loads")


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def reference_backbone_state(backbone: dict[str, Tensor],
                             table_px: int | None = REFERENCE_TABLE_PX) -> dict[str, Tensor]:
    """Our backbone state dict as a released backbone file holds it (a ViT's position table
    resampled to ``table_px``; None keeps it)."""
    _dino_v1_only(backbone)
    return _cpu(_table_for_reference(backbone, table_px))


def reference_checkpoint(teacher: dict[str, Tensor], student: dict[str, Tensor] | None = None,
                         *, center: Tensor | None = None, epoch: int = 0,
                         args: dict[str, Any] | None = None,
                         table_px: int | None = REFERENCE_TABLE_PX) -> dict[str, Any]:
    """main_dino's ``checkpoint.pth`` dict of our multi-crop wrapper state dicts.

    ``args``: main_dino arguments to record (the rest keep main_dino's defaults); ``arch``,
    ``patch_size``, ``out_dim`` and ``use_bn_in_head`` always come from the tensors.
    """
    backbone, head = keys.split_wrapper(teacher)
    _dino_v1_only(backbone)
    meta = keys.backbone_meta(backbone)
    batchnorm = any(k.endswith("running_mean") for k in teacher)

    def wrapper(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        b, h = keys.split_wrapper(state)
        return _cpu(keys.join_wrapper(_table_for_reference(b, table_px),
                                      keys.head_to_reference(h), prefix))

    derived: dict[str, Any] = {"arch": meta["arch"], "patch_size": meta["patch_size"]}
    if head:
        hm = keys.head_meta(head)
        derived.update(out_dim=hm["out_dim"], use_bn_in_head=hm["use_bn"])
    out: dict[str, Any] = {"teacher": wrapper(teacher, "module." if batchnorm else "")}
    if student is not None:
        out["student"] = wrapper(student, "module.")
    out["epoch"] = int(epoch)
    out["args"] = argparse.Namespace(**{**MAIN_DINO_DEFAULTS, **(args or {}), **derived})
    if center is not None:
        out["dino_loss"] = {"center": center.detach().cpu().reshape(1, -1).clone()}
    return out


def save_reference(path: str | Path, obj: dict[str, Any]) -> Path:
    """Writes a dict of ``reference_checkpoint`` or ``reference_backbone_state``."""
    torch.save(obj, str(path))
    return Path(path)
