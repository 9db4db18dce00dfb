"""``torch.hub`` entry points: this repository's backbones, from local weight files.

    model = torch.hub.load("/path/to/this/repo", "vit_small", source="local",
                           weights="dino_deitsmall16_pretrain.pth")

``weights``: a reference DINO file (main_dino's ``checkpoint.pth`` or a released backbone
file such as ``dino_deitsmall16_pretrain.pth``; its teacher), a Meta DINOv2 / DINOv3
backbone file (entry points named as Meta's hub names them, with ``_reg4`` for the register
models: ``dinov2_vits14``, ``dinov2_vits14_reg4``, ``dinov3_vits16``, ...; weights from
``dinov2_vits14_pretrain.pth``, ``dinov3_vits16_pretrain_lvd1689m-08c60483.pth``, ...) or a
``.safetensors`` backbone exported by ``dino export``; without it, a randomly initialised backbone. Nothing is
downloaded (``pretrained=True`` is refused). The architecture and shapes come from the file
and must be the entry point's (and ``patch_size`` / ``depth`` when given). Returns the
backbone in eval mode: images ``(B, 3, H, W)`` to CLS features ``(B, D)``. Only
``dino_core`` is imported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

dependencies = ["torch", "timm"]


def _backbone(arch: str, weights: str | None, pretrained: bool, **kwargs: Any) -> nn.Module:
    from dino_core.interop.export import load_backbone
    from dino_core.interop.reference_keys import backbone_meta, describe
    from dino_core.models.backbone import build_backbone
    from dino_core.models.families import FAMILY_ARCHS

    if pretrained:
        raise ValueError("no downloads here: pass weights=PATH (a reference .pth, e.g. "
                         "dino_deitsmall16_pretrain.pth, or an exported .safetensors)")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    family = FAMILY_ARCHS.get(arch)
    if weights is None:
        patch = family.patch_size if family else 16
        return build_backbone(arch, **{"patch_size": patch, **kwargs}).eval()
    model = load_backbone(weights)
    meta = backbone_meta(model.state_dict())
    if meta["arch"] != "resnet50" and meta["depth"] is None:  # the architecture's own
        held = FAMILY_ARCHS.get(meta["arch"])
        meta["depth"] = held.depth if held else 12
    other = {k: v for k, v in kwargs.items() if meta.get(k, v) != v}
    if meta["arch"] != arch or other:
        raise ValueError(f"{weights} holds {describe(meta)}, not {arch} "
                         + " ".join(f"{k}={v}" for k, v in other.items()))
    return model


def vit_tiny(weights: str | None = None, pretrained: bool = False,
             patch_size: int | None = None, **kwargs: Any) -> nn.Module:
    """ViT-Tiny (192 wide, 3 heads). ``patch_size``: 16 for random weights, else the file's
    (given, it must match); ``kwargs``: ``depth``, and for random weights ``img_size`` and
    ``pos_embed_interpolation``, as ``dino_core.models.build_backbone`` takes them."""
    return _backbone("vit_tiny", weights, pretrained, patch_size=patch_size, **kwargs)


def vit_small(weights: str | None = None, pretrained: bool = False,
              patch_size: int | None = None, **kwargs: Any) -> nn.Module:
    """ViT-S (384 wide, 6 heads), the paper's main model; see ``vit_tiny``."""
    return _backbone("vit_small", weights, pretrained, patch_size=patch_size, **kwargs)


def vit_base(weights: str | None = None, pretrained: bool = False,
             patch_size: int | None = None, **kwargs: Any) -> nn.Module:
    """ViT-B (768 wide, 12 heads); see ``vit_tiny``."""
    return _backbone("vit_base", weights, pretrained, patch_size=patch_size, **kwargs)


def resnet50(weights: str | None = None, pretrained: bool = False) -> nn.Module:
    """torchvision's ResNet-50 without ``fc`` (2048-d features)."""
    return _backbone("resnet50", weights, pretrained)


def _meta_entry(arch: str) -> Any:
    def entry(weights: str | None = None, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _backbone(arch, weights, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = arch
    entry.__doc__ = (f"Meta's {arch} (timm's modules); ``weights``: Meta's released file or an "
                     "export of a run of this arch; ``kwargs``: ``depth``, and for random "
                     "weights ``img_size``, as ``dino_core.models.build_backbone`` takes them.")
    return entry


dinov2_vits14 = _meta_entry("dinov2_vits14")
dinov2_vitb14 = _meta_entry("dinov2_vitb14")
dinov2_vitl14 = _meta_entry("dinov2_vitl14")
dinov2_vitg14 = _meta_entry("dinov2_vitg14")
dinov2_vits14_reg4 = _meta_entry("dinov2_vits14_reg4")
dinov2_vitb14_reg4 = _meta_entry("dinov2_vitb14_reg4")
dinov2_vitl14_reg4 = _meta_entry("dinov2_vitl14_reg4")
dinov2_vitg14_reg4 = _meta_entry("dinov2_vitg14_reg4")
dinov3_vits16 = _meta_entry("dinov3_vits16")
dinov3_vitb16 = _meta_entry("dinov3_vitb16")
dinov3_vitl16 = _meta_entry("dinov3_vitl16")
