"""Self-attention maps of the CLS token: heat maps, thresholded masks, and their Jaccard score.

The DINO paper (Caron et al., 2021, Sec. 4.2.1, Fig. 1/3, Table 7) shows that the last block's
CLS-to-patch attention of a self-supervised ViT segments the main object without supervision.
Masks keep the smallest set of patches that holds a fraction (60%) of a head's attention mass,
as the reference ``visualize_attention.py`` does, and are scored by Jaccard similarity with the
ground-truth object mask (here the procedural shapes' masks instead of PASCAL VOC's).

Only torch, numpy and PIL: the colormap is a small lookup table, so no matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn

from dino_core.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from dino_core.data.procedural import ProceduralShapes
from dino_core.models.backbone import is_vit
from dino_core.models.vit_features import last_self_attention

# Anchors of matplotlib's perceptually uniform maps at 0, 1/8, ..., 1 (sRGB 0-255); lightness
# rises monotonically along both, so brighter always means more attention.
# fmt: off
COLORMAPS: dict[str, np.ndarray] = {
    "inferno": np.array(
        [(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
         (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)], dtype=np.float32),
    "viridis": np.array(
        [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
         (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float32),
}
# fmt: on


def vit_patch_size(vit: nn.Module) -> int:
    """The (square) patch side of a timm ViT."""
    if not is_vit(vit):
        raise TypeError(f"attention maps need a ViT backbone, got {type(vit).__name__}")
    patch_embed: Any = vit.patch_embed
    return int(patch_embed.patch_size[0])


def crop_to_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Crops ``(..., H, W)`` to ``(..., H - H % p, W - W % p)`` (top-left kept, as the reference)."""
    h, w = x.shape[-2:]
    if h < patch_size or w < patch_size:
        raise ValueError(f"image {h}x{w} is smaller than one {patch_size}px patch")
    return x[..., : h - h % patch_size, : w - w % patch_size]


def prepare_image(
    image: Image.Image, patch_size: int, image_size: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Resizes (shorter side to ``image_size``), crops to a multiple of the patch size and
    normalises one image.

    Returns:
        ``(x, rgb)``: the network input ``(1, 3, H, W)`` float32 and the same crop as uint8
        ``(H, W, 3)`` for drawing overlays on.
    """
    image = image.convert("RGB")
    if image_size is not None:
        scale = image_size / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    rgb = crop_to_patches(TF.pil_to_tensor(image), patch_size)
    x = TF.normalize(rgb.float() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))
    return x.unsqueeze(0), rgb.permute(1, 2, 0).numpy()


@torch.no_grad()
def cls_attention(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention of the last block, batched.

    Args:
        vit: the backbone.
        x: images ``(B, 3, H, W)``; cropped here to multiples of the patch size.

    Returns:
        ``(B, heads, h, w)`` with ``h = H // p``, ``w = W // p``; each head's map sums to at
        most 1 (the CLS token's attention to itself and to prefix tokens is left out).
    """
    p = vit_patch_size(vit)
    x = crop_to_patches(x, p)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    attn = last_self_attention(vit, x)  # (B, heads, N, N), prefix tokens first
    return attn[:, :, 0, vit.num_prefix_tokens :].reshape(x.shape[0], -1, h, w)


def attention_maps(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-head attention maps of one image ``(1, 3, H, W)`` (or ``(3, H, W)``): ``(heads, h, w)``."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError(f"expected one image, got a batch of {x.shape[0]}; use cls_attention")
    return cls_attention(vit, x)[0]


def attention_masks(attn: torch.Tensor, keep: float = 0.6, patch_size: int = 1) -> torch.Tensor:
    """Smallest set of patches holding at least ``keep`` of each map's attention mass.

    The reference's rule: sort ascending, normalise, cumulative sum, keep the patches whose
    cumulative mass exceeds ``1 - keep`` (so ties at the boundary follow the sort order).

    Args:
        attn: maps ``(..., h, w)``, non-negative.
        keep: fraction of the mass kept, in (0, 1] (paper: 0.6).
        patch_size: nearest-neighbour upsampling factor (the patch size gives pixels).

    Returns:
        Bool masks ``(..., h * patch_size, w * patch_size)``.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    h, w = attn.shape[-2:]
    flat = attn.reshape(-1, h * w).double()  # float64: exact cumulative sums at the boundary
    val, idx = torch.sort(flat, dim=-1)
    val = val / val.sum(dim=-1, keepdim=True)
    kept_sorted = torch.cumsum(val, dim=-1) > (1.0 - keep)
    # scatter back to patch order: the reference's argsort(idx) gather
    kept = torch.zeros_like(kept_sorted).scatter_(-1, idx, kept_sorted)
    kept = kept.reshape(*attn.shape[:-2], h, w)
    return kept.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def jaccard(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape; 1.0 if both are empty."""
    a, b = _as_bool_array(pred), _as_bool_array(target)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _as_bool_array(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool, copy=False)


def apply_colormap(values: np.ndarray, name: str = "inferno") -> np.ndarray:
    """Maps values in [0, 1] of any shape ``S`` to uint8 colours ``(*S, 3)``."""
    anchors = COLORMAPS[name]
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    grid = np.linspace(0.0, 1.0, len(anchors))
    rgb = [np.interp(v, grid, anchors[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def heatmap_overlay(
    image: np.ndarray | Image.Image,
    attn_map: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    cmap: str = "inferno",
) -> Image.Image:
    """Blends a colour-mapped attention map over an image.

    Args:
        image: uint8 ``(H, W, 3)`` or an RGB PIL image.
        attn_map: ``(h, w)``; bilinearly upsampled to ``(H, W)`` and min-max normalised.
        alpha: weight of the heat map.
        cmap: a key of :data:`COLORMAPS`.

    Returns:
        An RGB PIL image of the input's size.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    height, width = rgb.shape[:2]
    a = torch.as_tensor(np.asarray(attn_map), dtype=torch.float32)[None, None]
    a = F.interpolate(a, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = a.min(), a.max()
    a = (a - lo) / (hi - lo) if hi > lo else torch.zeros_like(a)
    heat = apply_colormap(a.numpy(), cmap).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def image_grid(tiles: Sequence[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tiles same-sized images row-major on a white canvas, ``pad`` pixels apart."""
    if not tiles:
        raise ValueError("no images to tile")
    ncols = ncols or len(tiles)
    nrows = -(-len(tiles) // ncols)
    w, h = tiles[0].size
    canvas = Image.new(
        "RGB", (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), (255, 255, 255)
    )
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        canvas.paste(tile.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def attention_grid(
    image: np.ndarray,
    attn: torch.Tensor,
    ncols: int | None = None,
    alpha: float = 0.5,
    cmap: str = "inferno",
) -> Image.Image:
    """The image, then one heat-map overlay per head ``attn (heads, h, w)``, as one picture
    (one row unless ``ncols`` is given)."""
    tiles = [Image.fromarray(image)]
    tiles += [heatmap_overlay(image, a, alpha, cmap) for a in attn]
    return image_grid(tiles, ncols)


@torch.no_grad()
def mask_jaccard_over_dataset(
    vit: nn.Module,
    dataset: ProceduralShapes,
    n: int,
    image_size: int | None = None,
    keep: float = 0.6,
    batch_size: int = 32,
) -> dict:
    """Mean Jaccard similarity of each head's attention mask with the object mask.

    Images ``0 .. n-1`` of ``dataset`` are resized to ``image_size`` (their masks with
    nearest-neighbour), cropped to a multiple of the patch size, and masked at ``keep`` of the
    attention mass (paper Table 7 protocol, on procedural shapes).

    Returns:
        ``{"per_head": [mean Jaccard of head i], "best_head": i, "best": float,
        "mean": mean over heads, "n": n}``.
    """
    if not 0 < n <= len(dataset):
        raise ValueError(f"n must be in [1, {len(dataset)}], got {n}")
    p = vit_patch_size(vit)
    was_training = vit.training
    vit.eval()
    device = next(vit.parameters()).device
    scores = []  # (n, heads)
    for start in range(0, n, batch_size):
        xs, gts = [], []
        for i in range(start, min(start + batch_size, n)):
            image, _, mask = dataset.sample(i)
            if image_size is not None and image_size != image.width:
                image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
                mask = np.asarray(
                    Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST)
                )
            x, _ = prepare_image(image, p)
            xs.append(x)
            gts.append(np.asarray(mask)[: x.shape[-2], : x.shape[-1]])
        masks = attention_masks(cls_attention(vit, torch.cat(xs).to(device)).cpu(), keep, p)
        for pred, gt in zip(masks, gts):
            scores.append([jaccard(m, gt) for m in pred])
    vit.train(was_training)
    per_head = torch.tensor(scores, dtype=torch.float64).mean(dim=0)
    best = int(per_head.argmax())
    return {
        "per_head": per_head.tolist(),
        "best_head": best,
        "best": float(per_head[best]),
        "mean": float(per_head.mean()),
        "n": n,
    }
