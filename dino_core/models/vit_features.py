"""What the evaluations read out of a ViT besides the CLS feature.

Free functions over a timm ``VisionTransformer`` so the backbone stays a stock timm module
(its state dict is the one timm loads).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer


def _tokens_before_last_block(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    return x


@torch.no_grad()
def last_self_attention(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last block, as plotted in the paper's Fig. 1 and 3.

    Args:
        vit: the backbone.
        x: images ``(B, 3, H, W)``; H and W are cropped by the patch convolution to multiples
            of the patch size.

    Returns:
        ``(B, num_heads, N, N)`` with ``N = 1 + (H // p) * (W // p)`` (CLS token first).
    """
    tokens = _tokens_before_last_block(vit, x)
    blk: Any = vit.blocks[-1]  # a timm Block; typed loosely, timm's Sequential is untyped
    attn = blk.attn
    y = blk.norm1(tokens)
    b, n, _ = y.shape
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def intermediate_features(
    vit: VisionTransformer, x: torch.Tensor, n_last_blocks: int = 4, avgpool_patches: bool = False
) -> torch.Tensor:
    """Linear-probe features: the CLS token of the last ``n_last_blocks`` blocks, each after
    the final norm, concatenated; with ``avgpool_patches`` the mean patch token of the last
    block is appended (the paper's recipe for ViT-B: n=1 with avgpool; ViT-S: n=4 without).

    Returns:
        ``(B, n_last_blocks * D)`` or ``(B, (n_last_blocks + 1) * D)``.
    """
    outs = vit.get_intermediate_layers(x, n=n_last_blocks, return_prefix_tokens=True, norm=True)
    cls = [prefix[:, 0] for _, prefix in outs]
    if avgpool_patches:
        cls.append(outs[-1][0].mean(dim=1))
    return torch.cat(cls, dim=-1)


@torch.no_grad()
def patch_tokens(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Normalised patch tokens of the last block, ``(B, h * w, D)``."""
    feats = vit.forward_features(x)
    return feats[:, vit.num_prefix_tokens :]
