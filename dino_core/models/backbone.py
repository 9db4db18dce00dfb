"""Backbones: timm Vision Transformers (any patch size, any crop size) and a ResNet-50.

The ViTs are plain ``timm.models.vision_transformer.VisionTransformer`` instances with no
classifier (``num_classes=0``), so their state dict is the one timm's ``vit_*`` models load
with ``strict=True``. ``dynamic_img_size=True`` makes timm interpolate the position
embeddings to the crop's grid on every call, which multi-crop needs (224 and 96 crops in one
step) and which also covers odd sizes: a 100 px crop with patch 16 gives a 6x6 grid, the
remainder is dropped by the strided patch convolution as in the reference implementation.
"""

from __future__ import annotations

import torch
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


def build_backbone(
    arch: str = "vit_small",
    patch_size: int = 16,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    depth: int | None = None,
) -> nn.Module:
    """Builds a randomly initialised backbone whose ``forward`` returns the CLS feature.

    Args:
        arch: one of ``ARCHS``.
        patch_size: ViT patch size (16 and 8 in the paper; any size divides the crop).
        img_size: crop size the position embedding table is laid out for; other sizes are
            interpolated on the fly.
        drop_path_rate: stochastic depth of the student (0.1 in the paper; 0 for the teacher).
        depth: override of the number of blocks (small models for quick runs).

    Returns:
        A module mapping images ``(B, 3, H, W)`` to features ``(B, embed_dim)``; its
        ``embed_dim`` attribute gives the width.
    """
    if arch in VIT_SIZES:
        size = VIT_SIZES[arch]
        vit = VisionTransformer(
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
