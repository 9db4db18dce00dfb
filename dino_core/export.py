"""The teacher backbone as a timm-compatible safetensors file.

The file holds the backbone's state dict with timm's key names (our ViTs *are* timm
``VisionTransformer``s) and, in the safetensors metadata, the timm model name and the
keyword arguments that rebuild the same shapes, so
``timm.create_model(meta["timm_name"], num_classes=0, **json.loads(meta["timm_kwargs"]))``
loads it with ``strict=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

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


def load_backbone(path: str | Path) -> nn.Module:
    """Rebuilds the backbone of a file written by ``save_backbone`` (a local path; the service
    layer fetches remote URIs first), loading the weights with ``strict=True``."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if meta.get("format") != "dino-backbone-v1":
        raise ValueError(f"{path} is not a DINO backbone file (metadata: {meta})")
    model = build_backbone(
        meta["arch"],
        int(meta["patch_size"]),
        img_size=int(meta["img_size"]),
        depth=int(meta["depth"]) if meta["depth"] else None,
    )
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
