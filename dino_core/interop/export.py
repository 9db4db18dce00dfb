"""The teacher backbone as a timm-compatible safetensors file.

The file holds the backbone's state dict with timm's key names (our ViTs *are* timm
``VisionTransformer``s) and, in the safetensors metadata, the timm model name and the
keyword arguments that rebuild the same shapes, so
``timm.create_model(meta["timm_name"], num_classes=0, **json.loads(meta["timm_kwargs"]))``
loads it with ``strict=True``. The metadata also records ``pos_embed_interpolation``
(``dino_core.models.backbone``): a plain timm model resamples the position table timm's way,
so it gives the same features at the table's own size only when the file says "reference".

``load_backbone`` also reads the reference DINO code's ``.pth`` files and Meta's DINOv2 /
DINOv3 backbone files (``dino_core.interop.reference``, ``dino_core.interop.meta``).
A DINOv2 / DINOv3 arch is written with the timm model of its modules
(``vit_small_patch14_dinov2``, ``vit_small_patch16_dinov3_qkvb``, ...: ``families.timm_name``).
timm rebuilds the same features except where this project follows Meta: a plain DINOv2
model's position resize off the table's grid (DINO v1's formula, recorded as
"reference") and a DINOv3 model's RoPE periods (kept in the file as ``rope.periods``,
which timm recomputes in fp32 instead of using Meta's bf16-rounded ones).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dino_core.interop.reference import load_reference_backbone
from dino_core.models import families
from dino_core.models.backbone import build_backbone, timm_name

BACKBONE_PREFIX = "backbone."


def backbone_state_from_checkpoint(state: dict[str, Any], which: str = "teacher") -> dict:
    """The backbone weights of ``state[which]`` (a MultiCropWrapper state dict)."""
    net = state[which]
    return {
        k[len(BACKBONE_PREFIX) :]: v for k, v in net.items() if k.startswith(BACKBONE_PREFIX)
    }


def timm_kwargs(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` matching ``build_backbone``."""
    if model_cfg["arch"] == "resnet50":
        return {}
    if families.family_of(model_cfg["arch"]) is not None:
        return families.timm_kwargs(model_cfg["arch"], int(model_cfg.get("img_size") or 224),
                                    model_cfg.get("depth"))
    kwargs: dict[str, Any] = {"dynamic_img_size": True,
                              "patch_size": int(model_cfg.get("patch_size", 16))}
    if model_cfg.get("depth"):
        kwargs["depth"] = model_cfg["depth"]
    if model_cfg.get("img_size"):
        kwargs["img_size"] = model_cfg["img_size"]
    return kwargs


def save_backbone(path: str | Path, weights: dict[str, torch.Tensor], model_cfg: dict[str, Any],
                  extra: dict[str, str] | None = None) -> Path:
    """Writes the weights and the metadata that rebuilds the model.

    Args:
        model_cfg: ``arch``, ``patch_size``, optional ``depth`` and ``img_size``.
        extra: More metadata (strings), e.g. the run's settings; ``format`` and the model's
            keys cannot be overridden.
    """
    meta = {
        "format": "dino-backbone-v1",
        "arch": model_cfg["arch"],
        "patch_size": str(model_cfg.get("patch_size", 16)),
        "depth": str(model_cfg.get("depth") or ""),
        "img_size": str(model_cfg.get("img_size") or 224),
        "pos_embed_interpolation": str(model_cfg.get("pos_embed_interpolation") or "reference"),
        "timm_name": timm_name(model_cfg["arch"]),
        "timm_kwargs": json.dumps(timm_kwargs(model_cfg)),
    }
    meta = {**(extra or {}), **meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_backbone(path: str | Path, which: str = "teacher") -> nn.Module:
    """Rebuilds the backbone of a file written by ``save_backbone``, or of a reference DINO
    ``.pth`` file (a main_dino ``checkpoint.pth``, or a released backbone file) or a Meta
    DINOv2 / DINOv3 backbone file (its ``mask_token`` left out: ``read_reference`` returns
    it), from a local
    path (the service layer fetches remote URIs first); in eval mode.

    ``which``: ``teacher`` (a backbone file's only weights), ``student`` (a reference
    checkpoint's) or ``random`` (the same architecture freshly initialised). The weights
    load with ``strict=True``.
    """
    from safetensors.torch import load_file

    if str(path).endswith(".pth"):
        return load_reference_backbone(path, which)
    if which not in ("teacher", "random"):
        raise ValueError(f"an exported backbone holds only its own weights, not {which!r}")
    meta = read_metadata(path)
    if meta.get("format") != "dino-backbone-v1":
        raise ValueError(f"{path} is not a DINO backbone file (metadata: {meta})")
    model = build_backbone(
        meta["arch"],
        int(meta["patch_size"]),
        img_size=int(meta["img_size"]),
        depth=int(meta["depth"]) if meta["depth"] else None,
        # files written before the option existed come from models that resampled timm's way
        pos_embed_interpolation=meta.get("pos_embed_interpolation", "timm"),  # type: ignore[arg-type]
    )
    if which != "random":
        model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
