"""Backbones: timm Vision Transformers (any patch size, any crop size) and a ResNet-50.

The ViTs are ``timm.models.vision_transformer.VisionTransformer`` instances with no
classifier (``num_classes=0``), so their state dict is the one timm's ``vit_*`` models load
with ``strict=True`` (and, key for key, the reference DINO ViT's). ``dynamic_img_size=True``
resamples the position embeddings to the crop's grid on every call, which multi-crop needs
(224 and 96 crops in one step) and which also covers odd sizes: a 100 px crop with patch 16
gives a 6x6 grid, the remainder is dropped by the strided patch convolution as in the
reference implementation.

How the table is resampled is ``pos_embed_interpolation``: ``"reference"`` (a small subclass,
``DinoVisionTransformer``, with the same modules and state dict) does what the reference
DINO ViT's ``interpolate_pos_encoding`` does: bicubic without antialiasing, by the scale
factor ``(grid + 0.1) / table_side``; ``"timm"`` is timm's ``resample_abs_pos_embed``
(antialiased bicubic to the exact size). They agree at the table's own grid and differ
elsewhere (local crops, evaluation at another size).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models import resnet50

# Widths of the DINO paper's Table 1 (ViT-S has 6 heads of 64 dims, as in DeiT).
VIT_SIZES: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}
ARCHS = (*VIT_SIZES, "resnet50")
PosEmbedInterpolation = Literal["reference", "timm"]
POS_EMBED_INTERPOLATIONS: tuple[str, ...] = ("reference", "timm")


def reference_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The position table ``(1, 1 + N, D)`` (class token first, an ``N = s x s`` grid) for a
    ``rows x cols`` patch grid, as the reference DINO ViT's ``interpolate_pos_encoding``
    computes it: unchanged when the grid is the table's; else the patch part, as an
    ``(1, D, s, s)`` image, bicubic-interpolated (no antialiasing, ``align_corners=False``)
    by the scale factors ``((rows + 0.1) / s, (cols + 0.1) / s)``, the 0.1 making the floored
    output size ``rows x cols`` (dino issue #8); the scale factors themselves, not the
    output size, set the sampling positions (torch >= 1.6 semantics, as in the reference).

    The reference compares the image's pixel sides (``w == h``), this the grid's: they differ
    only for a non-square image whose square grid equals the table (e.g. 224 x 230 px at
    patch 16), which the reference resamples by a scale of 14.1 / 14 and this leaves alone.
    """
    n = pos_embed.shape[1] - 1
    if rows * cols == n and rows == cols:
        return pos_embed
    side = math.sqrt(n)
    s = int(side)
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, s, s, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                          mode="bicubic")
    if tuple(patch.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"interpolated position grid {tuple(patch.shape[-2:])} is not "
                           f"{(rows, cols)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], patch), dim=1)


class DinoVisionTransformer(VisionTransformer):
    """timm's ViT with the reference DINO position-table interpolation (same modules, same
    state dict; ``pos_embed_interpolation="timm"`` falls back to timm's own code)."""

    def __init__(self, *args: object, pos_embed_interpolation: PosEmbedInterpolation = "reference",
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(f"pos_embed_interpolation must be one of "
                             f"{', '.join(POS_EMBED_INTERPOLATIONS)}, got "
                             f"{pos_embed_interpolation!r}")
        self.pos_embed_interpolation = pos_embed_interpolation

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        table, cls = self.pos_embed, self.cls_token
        if (self.pos_embed_interpolation != "reference" or not self.dynamic_img_size
                or table is None or cls is None or self.reg_token is not None
                or self.no_embed_class):  # a layout the reference has no formula for
            return super()._pos_embed(x)
        b, rows, cols, c = x.shape  # dynamic_img_size: patch_embed keeps the (B, H, W, C) grid
        pos = reference_pos_embed(table, rows, cols)
        x = torch.cat((cls.expand(b, -1, -1), x.reshape(b, -1, c)), dim=1)
        return self.pos_drop(x + pos)


def build_backbone(
    arch: str = "vit_small",
    patch_size: int = 16,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    depth: int | None = None,
    pos_embed_interpolation: PosEmbedInterpolation = "reference",
) -> nn.Module:
    """Builds a randomly initialised backbone whose ``forward`` returns the CLS feature.

    Args:
        arch: one of ``ARCHS``.
        patch_size: ViT patch size (16 and 8 in the paper; any size divides the crop).
        img_size: crop size the position embedding table is laid out for; other sizes are
            interpolated on the fly.
        drop_path_rate: stochastic depth of the student (0.1 in the paper; 0 for the teacher).
        depth: override of the number of blocks (small models for quick runs).
        pos_embed_interpolation: how a ViT resamples its position table to another grid:
            ``"reference"`` (the reference DINO code's formula, the default: the paper's
            numbers and the released weights use it) or ``"timm"`` (timm's antialiased
            resampling); ignored by the ResNet.

    Returns:
        A module mapping images ``(B, 3, H, W)`` to features ``(B, embed_dim)``; its
        ``embed_dim`` attribute gives the width.
    """
    if arch in VIT_SIZES:
        size = VIT_SIZES[arch]
        vit = DinoVisionTransformer(
            pos_embed_interpolation=pos_embed_interpolation,
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            embed_dim=size["embed_dim"],
            depth=size["depth"] if depth is None else depth,
            num_heads=size["num_heads"],
        )
        # timm asserts H % patch == 0 when it knows the image size; forgetting it lets the
        # strided patch convolution drop the remainder, as the reference DINO ViT does
        vit.patch_embed.img_size = None  # type: ignore[assignment]
        return vit
    if arch == "resnet50":
        model = resnet50(weights=None)
        model.fc = nn.Identity()
        model.embed_dim = 2048
        return model
    raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHS)}")


def embed_dim_of(backbone: nn.Module) -> int:
    """Width of the backbone's output feature."""
    return int(backbone.embed_dim)  # type: ignore[arg-type]


def timm_name(arch: str) -> str:
    """A timm model name of ``arch``'s widths; the patch size goes as a keyword argument
    (``patch_size=8``), because timm registers only some pairs (there is no
    ``vit_tiny_patch8_224``)."""
    if arch == "resnet50":
        return "resnet50"
    return f"{arch}_patch16_224"


def is_vit(backbone: nn.Module) -> bool:
    return isinstance(backbone, VisionTransformer)


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copies parameters and buffers of ``src`` into ``dst`` (same architecture)."""
    dst.load_state_dict(src.state_dict(), strict=True)
