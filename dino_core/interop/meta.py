"""Meta's released DINOv2 and DINOv3 backbone files, in our key names.

The files are the state dicts of Meta's ``DinoVisionTransformer`` (``torch.hub`` entries
``dinov2_vit{s,b,l,g}14[_reg]``, ``dinov3_vit{s,b,l}16``), read by
``dino_core.interop.reference`` with the same safety as DINO v1's (``weights_only=True``).
Their keys:

* DINOv2 (``dinov2_vits14_pretrain.pth``, ``dinov2_vits14_reg4_pretrain.pth``, ...):
  ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + 37 * 37, D) (a 518 px table), ``mask_token``
  (1, D), ``register_tokens`` (1, 4, D) in the ``_reg4`` files, ``patch_embed.proj.*``
  (patch 14), ``norm.*``, and per block ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``,
  ``norm2``, ``mlp.fc1``, ``mlp.fc2`` (ViT-g: ``mlp.w12``, ``mlp.w3``, a fused SwiGLU),
  ``ls2.gamma``.
* DINOv3 (``dinov3_vits16_pretrain_lvd1689m-08c60483.pth``, ``dinov3_vitb16_...``,
  ``dinov3_vitl16_...``): ``cls_token``, ``storage_tokens`` (1, 4, D), ``mask_token``,
  ``patch_embed.proj.*`` (patch 16), ``rope_embed.periods`` (D_head / 4,), ``norm.*``, and per
  block ``norm1``, ``attn.qkv.{weight,bias,bias_mask}`` (the mask zeroes the k bias),
  ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``; ViT-L's
  SAT-493M file adds ``local_cls_norm.*``, a norm only its training used (dropped here).

Ours (``dino_core.models.families``, timm's modules): ``register_tokens``/``storage_tokens``
are ``reg_token``; a ``_reg4`` model's CLS position is folded into ``cls_token`` and its table
has no CLS entry (timm's ``no_embed_class``; Meta adds the CLS position unresized, so the sum
is the same); ViT-g's ``w12``/``w3`` are ``fc1``/``fc2``; DINOv3's ``ls1/ls2.gamma`` are
``gamma_1/gamma_2``, its qkv bias is ``q_bias`` and ``v_bias`` (k's is fixed at zero) and its
periods ``rope.periods``. ``mask_token`` is no backbone weight here: it is returned beside the
backbone (iBOT's student may hold one). The architecture comes from the tensors: width ->
size, block count -> depth, register count, patch size, table side.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from dino_core.models.families import FAMILY_ARCHS

Tensor = torch.Tensor
DINOV3_IMG_SIZE = 224  # Meta's hub img_size; a RoPE model has no table to lay out
_BLOCK = re.compile(r"blocks\.(\d+)\.")


@dataclass
class MetaBackbone:
    """One Meta file in our names: ``meta`` is ``build_backbone``'s ``arch``, ``patch_size``,
    ``depth`` (None: the architecture's own), ``img_size``; ``notes`` say what was left out."""

    family: str
    meta: dict[str, Any]
    state: dict[str, Tensor]
    mask_token: Tensor | None
    notes: list[str] = field(default_factory=list)


def is_meta_layout(state: dict[str, Tensor]) -> bool:
    """A Meta DINOv2/DINOv3 backbone state dict (DINO v1's files have none of these keys)."""
    return any(k in state for k in ("mask_token", "register_tokens", "storage_tokens",
                                    "rope_embed.periods")) or "blocks.0.ls1.gamma" in state


def _depth(state: dict[str, Any]) -> int:
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    return max(blocks) + 1 if blocks else 0


def _arch(family: str, dim: int, patch: int, regs: int) -> str:
    for name, f in FAMILY_ARCHS.items():
        if (f.family, f.embed_dim, f.reg_tokens) == (family, dim, regs):
            if f.patch_size != patch:
                raise ValueError(f"a {family} file of width {dim} with patch {patch}: {name} "
                                 f"has patch {f.patch_size}")
            return name
    known = ", ".join(f"{n} (width {f.embed_dim}, {f.reg_tokens} registers)"
                      for n, f in FAMILY_ARCHS.items() if f.family == family)
    raise ValueError(f"a {family} file of width {dim} with {regs} register tokens: none of "
                     f"{known}")


def expected_keys(arch: str, depth: int) -> set[str]:
    """Every key of Meta's state dict of ``arch`` with ``depth`` blocks."""
    f = FAMILY_ARCHS[arch]
    keys = {"cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    mlp = ("mlp.w12", "mlp.w3") if f.swiglu else ("mlp.fc1", "mlp.fc2")
    layers = ["norm1", "attn.qkv", "attn.proj", "norm2", *mlp]
    if f.family == "dinov2":
        keys |= {"pos_embed"} | ({"register_tokens"} if f.reg_tokens else set())
    else:
        keys |= {"storage_tokens", "rope_embed.periods"}
    for i in range(depth):
        keys |= {f"blocks.{i}.{layer}.{p}" for layer in layers for p in ("weight", "bias")}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
        if f.family == "dinov3":
            keys.add(f"blocks.{i}.attn.qkv.bias_mask")
    return keys


def _check_keys(state: dict[str, Tensor], arch: str, depth: int, optional: set[str]) -> None:
    expected = expected_keys(arch, depth)
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected - optional)
    if missing or unexpected:
        raise ValueError(f"the tensors look like Meta's {arch} with {depth} blocks, but "
                         f"missing keys: {missing[:8]}; unexpected keys: {unexpected[:8]}")


def _split_qkv_bias(key: str, bias: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(q_bias, v_bias) of Meta's ``LinearKMaskedBias``: a k bias masked to zero."""
    d = bias.shape[0] // 3
    want = torch.ones_like(bias)
    want[d : 2 * d] = 0
    if not torch.equal(mask.to(want.dtype), want):
        raise ValueError(f"{key}_mask is not the k-bias mask (1 for q and v, 0 for k): such "
                         "a model has a k bias, which timm's DINOv3 attention has not")
    return bias[:d], bias[2 * d :]


def _dinov2_to_ours(state: dict[str, Tensor], regs: int) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        key = "reg_token" if key == "register_tokens" else key
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    if regs:  # timm's no_embed_class table: the CLS position moves into the CLS token
        out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        out["pos_embed"] = state["pos_embed"][:, 1:]
    return out


def _dinov3_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    rename = {"storage_tokens": "reg_token", "rope_embed.periods": "rope.periods"}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "mask_token" or key.startswith("local_cls_norm.") or key.endswith("bias_mask"):
            continue
        if key.endswith(".attn.qkv.bias"):
            q, v = _split_qkv_bias(key, value, state[key + "_mask"])
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
            continue
        key = rename.get(key, key)
        out[key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = value
    return out


def read_meta_state(state: dict[str, Tensor]) -> MetaBackbone:
    """A Meta backbone state dict (``is_meta_layout``) in our names, with its architecture.

    Raises:
        ValueError: naming the keys that are missing or unexpected for the architecture the
            tensors imply, or a width / register count / patch size of no known model.
    """
    family = "dinov3" if ("storage_tokens" in state or "rope_embed.periods" in state) \
        else "dinov2"
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"a {family} state dict without cls_token or patch_embed.proj.weight;"
                         f" keys: {sorted(state)[:8]}")
    dim = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    tokens = state.get("storage_tokens" if family == "dinov3" else "register_tokens")
    regs = int(tokens.shape[1]) if tokens is not None else 0
    arch = _arch(family, dim, patch, regs)
    depth = _depth(state)
    _check_keys(state, arch, depth, {"local_cls_norm.weight", "local_cls_norm.bias"})
    notes = []
    if family == "dinov2":
        n = state["pos_embed"].shape[1] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed holds {n} patch positions, no square grid")
        ours, img_size = _dinov2_to_ours(state, regs), side * patch
    else:
        ours, img_size = _dinov3_to_ours(state), DINOV3_IMG_SIZE
        if "local_cls_norm.weight" in state:
            notes.append("local_cls_norm dropped (a norm of local crops' CLS tokens that only "
                         "Meta's training used)")
    full = FAMILY_ARCHS[arch].depth
    meta = {"arch": arch, "patch_size": patch, "depth": None if depth == full else depth,
            "img_size": img_size}
    return MetaBackbone(family, meta, ours, state.get("mask_token"), notes)


def family_meta(state: dict[str, Tensor]) -> dict[str, Any] | None:
    """``build_backbone``'s ``arch``, ``patch_size``, ``depth``, ``img_size`` of a DINOv2 /
    DINOv3 backbone state dict in *our* names; None for any other."""
    if "blocks.0.gamma_1" in state or "rope.periods" in state:
        family, table = "dinov3", None
    elif "blocks.0.ls1.gamma" in state and "pos_embed" in state:
        family, table = "dinov2", state["pos_embed"]
    else:
        return None
    dim = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    regs = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    arch = _arch(family, dim, patch, regs)
    depth = _depth(state)
    img_size = DINOV3_IMG_SIZE
    if table is not None:
        img_size = math.isqrt(table.shape[1] - (0 if regs else 1)) * patch
    return {"arch": arch, "patch_size": patch,
            "depth": None if depth == FAMILY_ARCHS[arch].depth else depth, "img_size": img_size}
