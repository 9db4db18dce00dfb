"""Meta's DINOv2 and DINOv3 Vision Transformers, built from timm's modules.

The arch names are Meta's hub names (``dinov2_vits14``, ``dinov2_vits14_reg4``,
``dinov3_vits16``, ...); each model is the module timm registers for it, so its state dict is
the one ``timm.create_model(timm_name(arch), num_classes=0, **kwargs)`` loads strictly:

* DINOv2 (``vit_*_patch14[_reg4]_dinov2``): a ``VisionTransformer`` with LayerScale
  (``blocks.N.ls1.gamma``), patch 14, and in the ``_reg4`` models 4 register tokens
  (``reg_token``) and a position table without a CLS entry (``no_embed_class``: Meta's CLS
  position is folded into ``cls_token`` when its file is read). ViT-g uses a packed SwiGLU
  MLP. Position resize at another grid: Meta's hub resizes the plain models' tables as DINO
  v1 does (``interpolate_offset=0.1``, no antialias; ``reference_pos_embed``) and the
  register models' with antialias to the exact size, which is timm's own resize; so a plain
  model is ``position.DinoVisionTransformer`` (``pos_embed_interpolation="timm"`` switches it
  to timm's resize) and a ``_reg4`` model always resizes timm's (= Meta's) way.
* DINOv3 (``vit_*_patch16_dinov3_qkvb``): timm's ``Eva`` with axial RoPE (``rope_type=
  "dinov3"``, base 100, coordinates normalised per side), no learned position table, 4
  storage tokens (``reg_token``), LayerScale (``gamma_1``/``gamma_2``), LayerNorm eps 1e-5,
  q and v biases and a fixed zero k bias (Meta's ``mask_k_bias``). The RoPE periods are kept
  in the state dict (``rope.periods``; timm recomputes them), because Meta's files carry
  bf16-rounded periods that its model uses: features equal Meta's only with those.
  Meta's DINOv3 training configs also rescale the student's RoPE coordinates by a
  log-uniform factor in [1/2, 2] (``pos_embed_rope_rescale_coords: 2``; its teacher runs in
  eval mode, without it). Our step runs the teacher in train mode, so the factor would reach
  the teacher too: it is off unless asked for (``rope_rescale``; timm draws one factor per
  forward, Meta one per block).

LayerScale starts at 1e-5, and stochastic depth is uniform over the blocks
(``drop_path_uniform: true`` in dinov2's config; dinov3 builds every block with the same
rate), not timm's linear ramp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

from timm.layers import DropPath, LayerNorm, SwiGLUPacked
from timm.models.eva import Eva
from torch import nn

from dino_core.models.position import DinoVisionTransformer, PosEmbedInterpolation

LAYERSCALE_INIT = 1e-5


@dataclass(frozen=True)
class Family:
    """Shapes of one Meta architecture."""

    family: str  # "dinov2" or "dinov3"
    size: str  # timm's size word: small, base, large, giant
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    reg_tokens: int = 0
    swiglu: bool = False  # dinov2 ViT-g's fused SwiGLU MLP


def _dinov2(size: str, dim: int, depth: int, heads: int, swiglu: bool = False) -> dict:
    letter = size[0]
    return {f"dinov2_vit{letter}14": Family("dinov2", size, 14, dim, depth, heads, 0, swiglu),
            f"dinov2_vit{letter}14_reg4": Family("dinov2", size, 14, dim, depth, heads, 4, swiglu)}


FAMILY_ARCHS: dict[str, Family] = {
    **_dinov2("small", 384, 12, 6), **_dinov2("base", 768, 12, 12),
    **_dinov2("large", 1024, 24, 16), **_dinov2("giant", 1536, 40, 24, swiglu=True),
    "dinov3_vits16": Family("dinov3", "small", 16, 384, 12, 6, 4),
    "dinov3_vitb16": Family("dinov3", "base", 16, 768, 12, 12, 4),
    "dinov3_vitl16": Family("dinov3", "large", 16, 1024, 24, 16, 4),
}  # fmt: skip


def family_of(arch: str) -> Family | None:
    return FAMILY_ARCHS.get(arch)


def timm_name(arch: str) -> str:
    """The timm model whose modules ``arch`` uses (e.g. ``vit_small_patch14_reg4_dinov2``)."""
    f = FAMILY_ARCHS[arch]
    if f.family == "dinov2":
        return f"vit_{f.size}_patch14{'_reg4' if f.reg_tokens else ''}_dinov2"
    return f"vit_{f.size}_patch16_dinov3_qkvb"


def timm_kwargs(arch: str, img_size: int, depth: int | None) -> dict:
    """What ``timm.create_model(timm_name(arch), num_classes=0, **kwargs)`` needs to build
    the same shapes and outputs (CLS pooling, any crop size)."""
    kwargs: dict = {"img_size": img_size, "dynamic_img_size": True}
    if FAMILY_ARCHS[arch].family == "dinov3":
        kwargs["global_pool"] = "token"
    if depth:
        kwargs["depth"] = depth
    return kwargs


def _uniform_drop_path(blocks: Any, rate: float) -> None:
    for blk in blocks:
        blk.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        blk.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def build_family_backbone(
    arch: str,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    depth: int | None = None,
    pos_embed_interpolation: PosEmbedInterpolation = "reference",
    rope_rescale: float | None = None,
) -> nn.Module:
    """A randomly initialised ``arch`` (a key of ``FAMILY_ARCHS``) mapping images
    ``(B, 3, H, W)`` to the normalised CLS token ``(B, embed_dim)``, for any ``H, W`` (the
    remainder of a side that is no multiple of the patch is dropped by the patch conv).

    ``img_size``: the side a DINOv2 position table is laid out for (Meta's files: 518);
    ``depth``: fewer blocks than the architecture's (quick runs and tests);
    ``rope_rescale``: DINOv3's train-mode RoPE coordinate rescaling (Meta's student: 2.0).
    """
    f = FAMILY_ARCHS[arch]
    depth = depth or f.depth
    model: Any  # timm's modules are loosely typed
    if f.family == "dinov2":
        extra: dict = {"reg_tokens": f.reg_tokens, "no_embed_class": True} if f.reg_tokens else {}
        if f.swiglu:  # Meta's hidden width: (int(4 * D * 2 / 3) + 7) // 8 * 8, packed x2
            extra.update(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        model = DinoVisionTransformer(
            pos_embed_interpolation=pos_embed_interpolation, img_size=img_size,
            patch_size=f.patch_size, num_classes=0, dynamic_img_size=True,
            embed_dim=f.embed_dim, depth=depth, num_heads=f.num_heads,
            init_values=LAYERSCALE_INIT, **extra)
    else:
        model = Eva(
            img_size=img_size, patch_size=f.patch_size, num_classes=0, global_pool="token",
            embed_dim=f.embed_dim, depth=depth, num_heads=f.num_heads, qkv_bias=True,
            init_values=LAYERSCALE_INIT, rope_type="dinov3", rope_temperature=100,
            rope_rotate_half=True, rope_rescale_coords=rope_rescale, use_rot_pos_emb=True,
            use_abs_pos_emb=False, num_reg_tokens=f.reg_tokens, use_fc_norm=False,
            norm_layer=partial(LayerNorm, eps=1e-5), dynamic_img_size=True)
        rope = model.rope
        rope.register_buffer("periods", rope.periods, persistent=True)
        for i, blk in enumerate(model.blocks):  # undo Eva's depth rescaling: Meta has none
            blk.attn.proj.weight.data.mul_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.mul_(math.sqrt(2.0 * (i + 1)))
    # as for DINO v1's ViTs (and Meta's): a side that is no multiple of the patch is cropped
    # by the strided conv; timm asserts divisibility when it knows the image size
    model.patch_embed.img_size = None
    _uniform_drop_path(model.blocks, drop_path_rate)
    return model
