"""A ViT's forward with iBOT's mask token: the CLS feature and the patch tokens of each crop.

iBOT (Zhou et al. 2022, Sec. 3.2) and DINOv2 (Oquab et al. 2024, Sec. 4; its
``prepare_tokens_with_masks``) replace the embeddings of the masked patches by a learned
token *before* the position embeddings are added, so a masked patch still knows where it is.
timm's ``forward_features`` has no place for that, so this runs its steps one by one
(``patch_embed``, the swap, ``_pos_embed``, ``norm_pre``, the blocks, ``norm``) for the two
timm classes the architectures use: ``VisionTransformer`` (DINO, DINOv2) and ``Eva``
(DINOv3: RoPE, whose rotary table comes out of ``_pos_embed`` and goes into every block).
Without a mask the result equals timm's own forward, token for token.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint


def _eva_class() -> type | None:
    try:
        from timm.models.eva import Eva
    except ImportError:  # pragma: no cover - every timm this project supports has it
        return None
    return Eva


def supports_masking(backbone: nn.Module) -> bool:
    """Whether ``backbone_tokens`` can run ``backbone`` (a timm ViT or Eva)."""
    eva = _eva_class()
    return isinstance(backbone, VisionTransformer) or (eva is not None and isinstance(backbone, eva))


def patch_grid(backbone: nn.Module, size: int) -> tuple[int, int]:
    """The ``(H, W)`` patches of a ``size`` px square crop (the strided patch convolution drops
    any remainder)."""
    patch = backbone.patch_embed.patch_size  # type: ignore[union-attr]
    return size // int(patch[0]), size // int(patch[1])  # type: ignore[index]


def backbone_tokens(
    backbone: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS feature and the normalised patch tokens of ``images``, masked patches replaced.

    Args:
        backbone: a timm ``VisionTransformer`` or ``Eva`` (``dynamic_img_size`` or not).
        images: ``(B, 3, H, W)``.
        masks: ``(B, N)`` bool, True where the patch's embedding is replaced (N = the patch
            grid in raster order); None: no masking.
        mask_token: ``(1, D)``, the learned token; needed with ``masks``.

    Returns:
        ``(cls, patches)``: ``(B, D)`` as ``backbone(images)`` returns it (the pooled, normed
        CLS token) and ``(B, N, D)``, the patch tokens after the final norm (registers and
        CLS left out).

    Raises:
        TypeError: the backbone is neither class (a ResNet has no patch tokens to mask).
    """
    eva = _eva_class()
    is_eva = eva is not None and isinstance(backbone, eva)
    if not (is_eva or isinstance(backbone, VisionTransformer)):
        raise TypeError(
            f"masked (iBOT) forward needs a timm VisionTransformer or Eva backbone, got "
            f"{type(backbone).__name__}; set loss.ibot_weight=0 and gram.weight=0 for it"
        )
    vit: Any = backbone
    x = vit.patch_embed(images)  # (B, H, W, D) with dynamic_img_size, else (B, N, D)
    if masks is not None:
        if mask_token is None:
            raise ValueError("masks given without a mask_token")
        keep_shape = x.shape[:-1]
        if masks.shape[0] != keep_shape[0] or masks[0].numel() != keep_shape[1:].numel():
            raise ValueError(f"masks {tuple(masks.shape)} do not match the patch grid "
                             f"{tuple(keep_shape)}")
        where = masks.to(x.device).reshape(keep_shape).unsqueeze(-1)
        x = torch.where(where, mask_token.to(x.dtype).reshape(-1), x)
    rope = None
    if is_eva:
        x, rope = vit._pos_embed(x)
    else:
        x = vit.patch_drop(vit._pos_embed(x))
    x = vit.norm_pre(x)
    checkpointing = vit.grad_checkpointing and torch.is_grad_enabled()
    if not is_eva:  # the stack as one call: a compiled stack (``compile_backbone``) stays so
        x = checkpoint_seq(vit.blocks, x) if checkpointing else vit.blocks(x)
    else:  # Eva's blocks take the rotary table (per block when "mixed")
        mixed = getattr(vit, "rope_mixed", False) and rope is not None
        blk: Any
        for i, blk in enumerate(vit.blocks):
            r = rope[i] if mixed else rope  # type: ignore[index]
            x = checkpoint(blk, x, rope=r, use_reentrant=False) if checkpointing else blk(x, rope=r)
    x = vit.norm(x)
    return vit.forward_head(x), x[:, vit.num_prefix_tokens:]
