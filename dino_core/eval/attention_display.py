"""Attention pictures for people to look at: small inputs enlarged by an integer factor, every
picture bounded in size, and one sheet of several images' heads.

``dino evaluate attention`` (``service.evaluate.attention``) draws one image this way, and the
training loop's evaluations (``service.train.evaluation``) a fixed few of the labeled split.
The maps are always computed on the network's input; only the drawing is scaled.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino_core.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from dino_core.eval.attention import attention_grid, cls_attention, image_grid, vit_patch_size

# Pictures of smaller images are enlarged by an integer factor up to this side, so a 48 px
# procedural image and its 6x6 attention grid are readable.
DISPLAY_MIN_SIDE = 224


def display_factor(height: int, width: int, max_side: int) -> int:
    """The integer factor a small input is enlarged by for viewing: up to ``DISPLAY_MIN_SIDE``
    on its shorter side, never past ``max_side`` on its longer one."""
    wanted = math.ceil(DISPLAY_MIN_SIDE / min(height, width))
    return max(1, min(wanted, max_side // max(height, width)))


def enlarge(picture: Image.Image, factor: int, resample: Image.Resampling) -> Image.Image:
    """``picture`` ``factor`` times larger on both sides (itself for 1)."""
    if factor == 1:
        return picture
    return picture.resize((picture.width * factor, picture.height * factor), resample)


def fit(picture: Image.Image, max_side: int) -> Image.Image:
    """``picture`` shrunk (aspect kept) so that its longer side is at most ``max_side``."""
    if max(picture.size) <= max_side:
        return picture
    scale = max_side / max(picture.size)
    size = (max(1, int(picture.width * scale)), max(1, int(picture.height * scale)))
    return picture.resize(size, Image.Resampling.LANCZOS)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised images ``(B, 3, H, W)`` back to uint8 ``(B, H, W, 3)``."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (x.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return rgb.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def attention_sheet(vit: nn.Module, x: torch.Tensor, max_side: int = 1024) -> Image.Image:
    """The last block's CLS-to-patch attention of a batch as one picture: a row per image,
    the image then one heat-map overlay per head (the paper's Fig. 3 layout).

    Args:
        vit: the backbone (put in eval mode for the call, then back).
        x: ImageNet-normalised images ``(B, 3, H, W)`` on ``vit``'s device; cropped to
            multiples of the patch size.
        max_side: the sheet's longest side; small images are enlarged up to it, a sheet that
            is still larger is shrunk to it.
    """
    was_training = vit.training
    vit.eval()
    try:
        attn = cls_attention(vit, x).float().cpu()  # (B, heads, h, w)
    finally:
        vit.train(was_training)
    p = vit_patch_size(vit)
    images = to_uint8(x[..., : attn.shape[-2] * p, : attn.shape[-1] * p])
    tiles = attn.shape[1] + 1  # the image and its heads, across
    height, width = images.shape[1:3]
    factor = display_factor(height, width, max(1, max_side // tiles))
    rows = []
    for image, maps in zip(images, attn):
        big = np.asarray(enlarge(Image.fromarray(image), factor, Image.Resampling.BICUBIC))
        rows.append(attention_grid(big, maps))
    return fit(image_grid(rows, ncols=1), max_side)
