"""What the evaluations read out of a ViT besides the CLS feature.

Free functions over a timm ``VisionTransformer`` (DINO v1, DINOv2) or ``Eva`` (DINOv3, with
rotary position embeddings) so the backbone stays a stock timm module (its state dict is the
one timm loads). Prefix tokens (CLS, then registers / storage tokens) come first.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat

from dino_core.models.backbone import is_rope_vit


def _tokens_before_last_block(vit: Any, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Tokens entering the last block, and the RoPE embedding (None without RoPE)."""
    x = vit.patch_embed(x)
    if is_rope_vit(vit):
        x, rope = vit._pos_embed(x)
        x = vit.norm_pre(x)
        for blk in vit.blocks[:-1]:
            x = blk(x, rope=rope)
        return x, rope
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    return x, None


def _qkv(attn: Any, y: torch.Tensor) -> torch.Tensor:
    if getattr(attn, "q_bias", None) is None:  # timm Attention, or Eva's without biases
        return attn.qkv(y)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))  # Eva: k bias fixed at zero
    return torch.nn.functional.linear(y, attn.qkv.weight, bias)


@torch.no_grad()
def last_self_attention(vit: Any, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last block, as plotted in the paper's Fig. 1 and 3.

    Args:
        vit: the backbone.
        x: images ``(B, 3, H, W)``; H and W are cropped by the patch convolution to multiples
            of the patch size.

    Returns:
        ``(B, num_heads, N, N)`` with ``N = P + (H // p) * (W // p)``: the ``P =
        vit.num_prefix_tokens`` prefix tokens first (CLS, then any registers).
    """
    tokens, rope = _tokens_before_last_block(vit, x)
    blk: Any = vit.blocks[-1]  # a timm Block; typed loosely, timm's Sequential is untyped
    attn = blk.attn
    y = blk.norm1(tokens)
    b, n, _ = y.shape
    qkv = _qkv(attn, y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:  # rotated patch tokens, prefix tokens as they are (Eva's attention)
        p, half = attn.num_prefix_tokens, attn.rotate_half
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def intermediate_features(
    vit: Any, x: torch.Tensor, n_last_blocks: int = 4, avgpool_patches: bool = False
) -> torch.Tensor:
    """Linear-probe features: the CLS token of the last ``n_last_blocks`` blocks, each after
    the final norm, concatenated; with ``avgpool_patches`` the mean patch token of the last
    block is appended (the paper's recipe for ViT-B: n=1 with avgpool; ViT-S: n=4 without).

    Returns:
        ``(B, n_last_blocks * D)`` or ``(B, (n_last_blocks + 1) * D)``.
    """
    outs = vit.forward_intermediates(x, indices=n_last_blocks, return_prefix_tokens=True,
                                     norm=True, output_fmt="NLC", intermediates_only=True)
    cls = [prefix[:, 0] for _, prefix in outs]
    if avgpool_patches:
        cls.append(outs[-1][0].mean(dim=1))
    return torch.cat(cls, dim=-1)


@torch.no_grad()
def patch_tokens(vit: Any, x: torch.Tensor) -> torch.Tensor:
    """Normalised patch tokens of the last block, ``(B, h * w, D)``."""
    feats = vit.forward_features(x)
    return feats[:, vit.num_prefix_tokens :]
