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
elsewhere (local crops, evaluation at another size); both live in ``position``.

Meta's DINOv2 and DINOv3 families (``dinov2_vits14``, ``dinov2_vits14_reg4``,
``dinov3_vits16``, ...: ``families.FAMILY_ARCHS``) are built by ``families``; their patch
size is the family's (14 or 16).
"""

from __future__ import annotations

import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models import resnet50

from dino_core.models import families
from dino_core.models.position import DinoVisionTransformer, PosEmbedInterpolation

# Widths of the DINO paper's Table 1 (ViT-S has 6 heads of 64 dims, as in DeiT).
VIT_SIZES: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}
ARCHS = (*VIT_SIZES, "resnet50", *families.FAMILY_ARCHS)


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
        patch_size: ViT patch size (16 and 8 in the paper; any size divides the crop); a
            DINOv2/DINOv3 arch has its own (14/16), and another value is an error.
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
    family = families.family_of(arch)
    if family is not None:
        if patch_size != family.patch_size:
            raise ValueError(f"{arch} has patch size {family.patch_size}, not {patch_size}")
        return families.build_family_backbone(arch, img_size, drop_path_rate, depth,
                                              pos_embed_interpolation)
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
    if families.family_of(arch) is not None:
        return families.timm_name(arch)
    return f"{arch}_patch16_224"


def is_vit(backbone: nn.Module) -> bool:
    """A timm ViT (DINO v1's and DINOv2's ``VisionTransformer``, DINOv3's ``Eva``)."""
    return isinstance(backbone, (VisionTransformer, Eva))


def is_rope_vit(backbone: nn.Module) -> bool:
    """A ViT with rotary position embeddings (DINOv3): its blocks take ``rope=``."""
    return isinstance(backbone, Eva)


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copies parameters and buffers of ``src`` into ``dst`` (same architecture)."""
    dst.load_state_dict(src.state_dict(), strict=True)
