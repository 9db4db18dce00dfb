"""The CLS feature and the patch grid of a backbone, whatever its kind.

Feature distillation reads both from the teacher and from the student, and they may be of
different kinds: a ViT (timm ``VisionTransformer`` or ``Eva``, any patch size; DINO, DINOv2,
DINOv3) gives its CLS feature and its patch tokens after the final norm
(``dino_core.models.masked.backbone_tokens``); a torchvision ResNet-50 has no tokens, so its
last feature map (``layer4``, stride 32) stands in for the patch grid, one "patch" per
32 x 32 px cell, and its global average pool (what ``backbone(images)`` returns) for the CLS
feature. Both are ``(B, D)`` and ``(B, h * w, D)`` in raster order, so the grids of any two
backbones can be matched by ``dino_core.distill.resample``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from torchvision.models import ResNet

from dino_core.models.backbone import is_vit
from dino_core.models.masked import backbone_tokens


class Tokens(NamedTuple):
    """``cls``: ``(B, D)``; ``patches``: ``(B, h * w, D)`` in raster order; ``grid``: ``(h, w)``."""

    cls: torch.Tensor
    patches: torch.Tensor
    grid: tuple[int, int]


def backbone_features(backbone: nn.Module, images: torch.Tensor) -> Tokens:
    """The CLS feature and the patch grid of ``images`` ``(B, 3, H, W)``.

    A ViT's grid is ``(H // p, W // p)`` for patch size p (the strided patch convolution drops
    any remainder); a ResNet-50's is the ``layer4`` map's, ``ceil(H / 32)`` for even sizes.

    Raises:
        TypeError: neither a timm ViT nor a torchvision ResNet.
    """
    if is_vit(backbone):
        vit: Any = backbone
        patch = vit.patch_embed.patch_size
        cls, patches = backbone_tokens(backbone, images)
        return Tokens(cls, patches, (images.shape[-2] // int(patch[0]),
                                     images.shape[-1] // int(patch[1])))
    if isinstance(backbone, ResNet):
        return _resnet_features(backbone, images)
    raise TypeError(f"distillation reads a timm ViT or a torchvision ResNet, got "
                    f"{type(backbone).__name__}")


def _resnet_features(net: ResNet, images: torch.Tensor) -> Tokens:
    """torchvision's ``ResNet._forward_impl`` up to ``layer4``, then both read-outs of it."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    fmap = net.layer4(net.layer3(net.layer2(net.layer1(x))))  # (B, D, h, w)
    cls = torch.flatten(net.avgpool(fmap), 1)  # == backbone(images): its fc is the identity
    return Tokens(cls, fmap.flatten(2).transpose(1, 2), (fmap.shape[-2], fmap.shape[-1]))
