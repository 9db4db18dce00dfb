"""Patch features as colours: the first three principal components of a ViT's patch tokens.

A common look inside a self-supervised ViT (DINOv2, Oquab et al. 2023, Fig. 1): patches of the
same object part get similar tokens, hence similar colours, with no labels involved.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from dino_core.eval.attention import crop_to_patches, vit_patch_size
from dino_core.models.vit_features import patch_tokens


def principal_components(tokens: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Projections of centred ``tokens (N, D)`` on their first ``k`` principal axes.

    Each axis' sign is fixed so that its largest-magnitude projection is positive (SVD signs
    are arbitrary), which keeps colours stable between runs. Fewer than ``k`` available axes
    (``min(N, D) < k``) are padded with zero columns.

    Returns:
        ``(N, k)`` float32.
    """
    x = tokens.float() - tokens.float().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:k].T  # (N, min(k, N, D))
    flip = proj.gather(0, proj.abs().argmax(dim=0, keepdim=True)).sign()
    proj = proj * torch.where(flip == 0, torch.ones_like(flip), flip)
    if proj.shape[1] < k:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], k - proj.shape[1])], dim=1)
    return proj


@torch.no_grad()
def pca_rgb(vit: nn.Module, x: torch.Tensor) -> Image.Image:
    """The first 3 principal components of one image's patch tokens as an RGB picture.

    Args:
        vit: the backbone.
        x: one image ``(1, 3, H, W)``, cropped here to multiples of the patch size ``p``.

    Returns:
        An RGB PIL image of the cropped input's size ``(H - H % p, W - W % p)``: each
        component min-max scaled to 0-255 over the image, one colour per patch (nearest
        upsampling keeps the patch grid visible).
    """
    p = vit_patch_size(vit)
    x = crop_to_patches(x if x.dim() == 4 else x.unsqueeze(0), p)
    if x.shape[0] != 1:
        raise ValueError(f"expected one image, got a batch of {x.shape[0]}")
    h, w = x.shape[-2] // p, x.shape[-1] // p
    was_training = vit.training
    vit.eval()
    tokens = patch_tokens(vit, x)[0].cpu()  # (h * w, D)
    vit.train(was_training)
    proj = principal_components(tokens, 3)
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    scaled = (proj - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    rgb = (scaled * 255).round().clamp(0, 255).to(torch.uint8).reshape(h, w, 3).numpy()
    return Image.fromarray(np.ascontiguousarray(rgb)).resize(
        (w * p, h * p), Image.Resampling.NEAREST
    )
