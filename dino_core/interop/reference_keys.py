"""Key names of the reference DINO code (facebookresearch/dino) and ours, and the model
settings that tensors of either imply.

Backbones: our ViTs are timm ``VisionTransformer``s, whose state dict (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}.*``, ``norm.*``; no ``norm_pre``/``fc_norm``/``head`` keys with CLS pooling and no
classifier) is the reference ``vision_transformer.VisionTransformer``'s key for key; the
ResNet-50 is torchvision's without ``fc``, as the reference's multi-crop wrapper leaves it.
Heads: the MLP has the same indices (``mlp.0``, BatchNorm at ``mlp.1`` when used, ...)
except that the reference's one-layer head is a bare ``mlp`` Linear; the last layer is
weight-normalised, old-style in the reference (``weight_g``, ``weight_v``), as a
parametrization here (``parametrizations.weight.original0``/``original1``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from dino_core.interop.meta import family_meta
from dino_core.models.backbone import VIT_SIZES
from dino_core.models.families import FAMILY_ARCHS

Tensor = torch.Tensor
_G_OURS, _V_OURS = "last_layer.parametrizations.weight.original0", \
    "last_layer.parametrizations.weight.original1"
_G_REF, _V_REF = "last_layer.weight_g", "last_layer.weight_v"
_ARCH_OF_DIM = {size["embed_dim"]: arch for arch, size in VIT_SIZES.items()}


def split_wrapper(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone, head) of a multi-crop wrapper's state dict, with or without DDP's
    ``module.`` prefix; keys of neither part are an error."""
    backbone: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    other = []
    for key, value in state.items():
        k = key.removeprefix("module.")
        if k.startswith("backbone."):
            backbone[k[len("backbone."):]] = value
        elif k.startswith("head."):
            head[k[len("head."):]] = value
        else:
            other.append(key)
    if other:
        raise ValueError(f"keys of neither backbone nor head: {other[:5]}")
    return backbone, head


def join_wrapper(backbone: dict[str, Tensor], head: dict[str, Tensor] | None,
                 prefix: str = "") -> dict[str, Tensor]:
    """The inverse of ``split_wrapper``: ``{prefix}backbone.*`` and ``{prefix}head.*``."""
    out = {f"{prefix}backbone.{k}": v for k, v in backbone.items()}
    out.update({f"{prefix}head.{k}": v for k, v in (head or {}).items()})
    return out


def backbone_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A reference backbone state dict in our names: the same, less a ResNet's ``fc``."""
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def head_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        key = {_G_REF: _G_OURS, _V_REF: _V_OURS}.get(key, key)
        out[re.sub(r"^mlp\.(weight|bias)$", r"mlp.0.\1", key)] = value
    return out


def head_to_reference(state: dict[str, Tensor]) -> dict[str, Tensor]:
    one_layer = not any(k.startswith("mlp.") and not k.startswith("mlp.0.") for k in state)
    out = {}
    for key, value in state.items():
        key = {_G_OURS: _G_REF, _V_OURS: _V_REF}.get(key, key)
        if one_layer:
            key = re.sub(r"^mlp\.0\.", "mlp.", key)
        out[key] = value
    return out


def backbone_meta(state: dict[str, Tensor]) -> dict[str, Any]:
    """``{"arch", "patch_size", "depth", "img_size"}`` (``build_backbone``'s arguments) of a
    backbone state dict in our names; ``depth`` is None at the architecture's 12 blocks and
    ``img_size`` is the side the position table is laid out for. DINOv2 / DINOv3 state dicts
    (``dino_core.interop.meta.family_meta``) give their family's arch."""
    family = family_meta(state)
    if family is not None:
        return family
    if "pos_embed" in state:
        dim = state["pos_embed"].shape[-1]
        if dim not in _ARCH_OF_DIM:
            raise ValueError(f"a ViT of width {dim}: none of "
                             + ", ".join(f"{a} ({d})" for d, a in _ARCH_OF_DIM.items()))
        arch = _ARCH_OF_DIM[dim]
        kh, kw = state["patch_embed.proj.weight"].shape[-2:]
        if kh != kw:
            raise ValueError(f"non-square patches {kh}x{kw}")
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
        depth = max(blocks) + 1 if blocks else 0
        n = state["pos_embed"].shape[1] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"a position table of {n} patches is no square grid")
        return {"arch": arch, "patch_size": int(kh),
                "depth": None if depth == VIT_SIZES[arch]["depth"] else depth,
                "img_size": side * int(kh)}
    if "conv1.weight" in state and "layer4.0.conv1.weight" in state:
        return {"arch": "resnet50", "patch_size": 16, "depth": None, "img_size": 224}
    raise ValueError("neither a ViT (pos_embed, patch_embed.proj.weight, blocks.N...) nor a "
                     f"ResNet-50 (conv1, layer1..4) state dict; keys: {sorted(state)[:6]}")


def describe(meta: dict[str, Any]) -> str:
    """``vit_small/16, depth 12, 224 px position table``-style text of ``backbone_meta``."""
    if meta["arch"] == "resnet50":
        return "resnet50"
    if meta["arch"] in FAMILY_ARCHS:
        f = FAMILY_ARCHS[meta["arch"]]
        where = "RoPE" if f.family == "dinov3" else f"{meta['img_size']} px position table"
        return f"{meta['arch']}, depth {meta['depth'] or f.depth}, {where}"
    depth = meta["depth"] or VIT_SIZES[meta["arch"]]["depth"]
    return (f"{meta['arch']}/{meta['patch_size']}, depth {depth}, "
            f"{meta['img_size']} px position table")


def head_meta(state: dict[str, Tensor]) -> dict[str, Any]:
    """``out_dim``, ``nlayers``, ``hidden_dim``, ``bottleneck_dim``, ``use_bn`` of a head
    state dict in our names."""
    linears = sorted((int(m.group(1)), v) for k, v in state.items()
                     if (m := re.match(r"mlp\.(\d+)\.weight$", k)) and v.ndim == 2)
    v = state[_V_OURS]
    return {"out_dim": int(v.shape[0]), "nlayers": len(linears),
            "hidden_dim": int(linears[0][1].shape[0]) if len(linears) > 1 else None,
            "bottleneck_dim": int(v.shape[1]),
            "use_bn": any(k.endswith("running_mean") for k in state)}


def describe_head(meta: dict[str, Any]) -> str:
    return (f"out_dim {meta['out_dim']}, {meta['nlayers']} layers, hidden "
            f"{meta['hidden_dim']}, bottleneck {meta['bottleneck_dim']}"
            + (", BatchNorm" if meta["use_bn"] else ""))

