"""Video object segmentation by nearest-neighbour label propagation of frozen patch features
(the DINO paper's DAVIS 2017 evaluation, Table 5, after Jabri et al.'s protocol
as in the reference ``eval_video_segmentation.py``).

The first frame's instance masks are given. Each later frame ``t`` takes its labels from the
first frame and the ``n_last_frames`` frames before it: every patch of ``t`` looks at the
patches of those frames within ``neighborhood`` patches of its own position, weighs them by
``exp(cos / 0.1)`` of their last-block features, keeps the ``topk`` largest weights over all
context frames and averages their (soft) labels. The soft label map is bilinearly upsampled
to the frame, min-max normalised per label and arg-maxed; the soft map, not the arg-max,
joins the queue of context frames, as in the reference.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn

from dino_core.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from dino_core.models.backbone import is_vit
from dino_core.models.vit_features import patch_tokens

AFFINITY_TEMPERATURE = 0.1  # the reference's exp(affinity / 0.1)
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def vit_frame_features(vit: nn.Module) -> FeatureFn:
    """``x (1, 3, H, W) -> (h * w, D)``: the last block's patch tokens (after the final norm,
    as the reference's ``get_intermediate_layers(x, n=1)``), l2-normalised."""
    if not is_vit(vit):
        raise TypeError(f"label propagation needs the patch tokens of a ViT, got "
                        f"{type(vit).__name__}")
    return lambda x: F.normalize(patch_tokens(vit, x)[0].float(), dim=-1)


def frame_size(height: int, width: int, short_side: int | None, patch_size: int) -> tuple[int, int]:
    """``(H, W)`` of the network input: the shorter side scaled to ``short_side`` (None: kept),
    the aspect ratio kept, both sides rounded down to whole patches.

    Raises:
        ValueError: a side ends up smaller than one patch.
    """
    scale = 1.0 if short_side is None else short_side / min(height, width)
    h = int(height * scale) // patch_size * patch_size
    w = int(width * scale) // patch_size * patch_size
    if h < patch_size or w < patch_size:
        raise ValueError(f"a {height}x{width} frame at short side {short_side} is smaller than "
                         f"one {patch_size} px patch")
    return h, w


def prepare_frame(frame: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """An RGB uint8 frame ``(H0, W0, 3)`` resized (bilinear) to ``size`` and normalised with the
    ImageNet statistics: ``(3, H, W)`` float32."""
    image = Image.fromarray(np.asarray(frame, dtype=np.uint8)).convert("RGB")
    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    x = TF.pil_to_tensor(image).float() / 255.0
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def neighborhood_mask(h: int, w: int, size: int) -> torch.Tensor:
    """``(h * w, h * w)`` float: 1 where the source patch (column) lies within ``size`` patches
    of the target patch (row) in both grid directions, else 0."""
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    near = ((ii[:, None] - ii[None, :]).abs() <= size) & ((jj[:, None] - jj[None, :]).abs() <= size)
    return near.float()


def one_hot_labels(mask: np.ndarray, grid: tuple[int, int], num_labels: int) -> torch.Tensor:
    """The instance mask ``(H0, W0)`` resized (nearest, as the reference) to the patch
    ``grid`` ``(h, w)``, one-hot: ``(num_labels, h, w)`` float32."""
    small = Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize(
        (grid[1], grid[0]), Image.Resampling.NEAREST)
    labels = torch.from_numpy(np.asarray(small, dtype=np.int64))
    return F.one_hot(labels.clamp(max=num_labels - 1), num_labels).permute(2, 0, 1).float()


def propagate(feat_tar: torch.Tensor, feat_src: torch.Tensor, seg_src: torch.Tensor, topk: int,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft labels of a target frame from context frames.

    Args:
        feat_tar: l2-normalised target features ``(N, D)``.
        feat_src: l2-normalised features of the ``C`` context frames ``(C, N, D)``.
        seg_src: their soft labels ``(C, K, h, w)`` with ``h * w = N``.
        topk: the largest affinities kept per target patch, over all ``C * N`` sources (ties
            with the k-th are kept too, as in the reference).
        mask: optional ``(N, N)`` 0/1 restriction (target rows, source columns).

    Returns:
        ``(K, h, w)``: per target patch the affinity-weighted mean of the kept sources' labels.
    """
    c, n, _ = feat_src.shape
    aff = torch.exp(torch.einsum("td,csd->cts", feat_tar, feat_src) / AFFINITY_TEMPERATURE)
    if mask is not None:
        aff = aff * mask
    aff = aff.transpose(1, 2).reshape(c * n, n)  # (sources of all contexts, targets)
    kth = aff.topk(min(topk, c * n), dim=0).values.min(dim=0).values
    aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
    aff = aff / aff.sum(dim=0, keepdim=True)
    k, h, w = seg_src.shape[1:]
    labels = seg_src.reshape(c, k, n).permute(1, 0, 2).reshape(k, c * n)
    return (labels @ aff).reshape(k, h, w)


def _normalise_per_label(seg: torch.Tensor) -> torch.Tensor:
    """The reference's ``norm_mask``: each label map with a positive maximum min-max scaled."""
    lo = seg.amin(dim=(1, 2), keepdim=True)
    span = seg.amax(dim=(1, 2), keepdim=True) - lo
    scaled = (seg - lo) / span.clamp_min(1e-12)
    keep = (seg.amax(dim=(1, 2), keepdim=True) > 0) & (span > 0)
    return torch.where(keep, scaled, seg)


def labels_to_mask(seg: torch.Tensor, patch_size: int, out_size: tuple[int, int]) -> np.ndarray:
    """Soft labels ``(K, h, w)`` -> instance mask ``(H0, W0)`` uint8: bilinear upsampling by the
    patch size, per-label min-max, arg-max, then nearest resizing to ``out_size``."""
    up = F.interpolate(seg[None], scale_factor=patch_size, mode="bilinear", align_corners=False)
    hard = _normalise_per_label(up[0]).argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(hard).resize((out_size[1], out_size[0]),
                                                   Image.Resampling.NEAREST))


def grid_round_trip(mask: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """A true instance mask ``(H0, W0)`` sent through the patch grid and back, as propagated
    labels are (one-hot at the grid, then :func:`labels_to_mask`): the best any propagation
    can score at this resolution."""
    mask = np.where(np.asarray(mask) == 255, 0, mask).astype(np.uint8)
    seg = one_hot_labels(mask, grid, int(mask.max()) + 1)
    return labels_to_mask(seg, patch_size, mask.shape)


@torch.no_grad()
def segment_video(features: FeatureFn, frames: Sequence[torch.Tensor], first_mask: np.ndarray,
                  patch_size: int, n_last_frames: int = 7, topk: int = 5,
                  neighborhood: int = 12) -> np.ndarray:
    """Propagates the first frame's instance mask through a video.

    Args:
        features: ``x (1, 3, H, W) -> (h * w, D)`` l2-normalised, e.g. :func:`vit_frame_features`.
        frames: the prepared frames ``(3, H, W)`` (:func:`prepare_frame`), H and W whole patches.
        first_mask: the first frame's instance ids ``(H0, W0)`` at the original resolution
            (0 background); the output has this resolution.
        n_last_frames: previous frames used besides the first (paper: 7).
        topk: neighbours whose labels are averaged (paper: 5).
        neighborhood: the source window's half-side in patches (paper: 12); 0 or less: none.

    Returns:
        The instance masks ``(T, H0, W0)`` uint8; frame 0 is ``first_mask``.
    """
    if topk < 1 or n_last_frames < 0:
        raise ValueError(f"need topk >= 1 and n_last_frames >= 0, got {topk} and {n_last_frames}")
    first_mask = np.asarray(first_mask, dtype=np.uint8)
    first_mask = np.where(first_mask == 255, 0, first_mask).astype(np.uint8)  # DAVIS "void"
    out_size = first_mask.shape
    grid = (frames[0].shape[-2] // patch_size, frames[0].shape[-1] // patch_size)
    first_feat = features(frames[0][None])
    if first_feat.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"features give {first_feat.shape[0]} patches, the {grid} grid needs "
                         f"{grid[0] * grid[1]}")
    first_seg = one_hot_labels(first_mask, grid, int(first_mask.max()) + 1).to(first_feat.device)
    mask = None
    if neighborhood > 0:
        mask = neighborhood_mask(*grid, neighborhood).to(first_feat.device)
    queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=n_last_frames or None)
    out = [first_mask]
    for frame in frames[1:]:
        feat = features(frame[None])
        context = [(first_feat, first_seg), *queue]
        seg = propagate(feat, torch.stack([f for f, _ in context]),
                        torch.stack([s for _, s in context]), topk, mask)
        if n_last_frames:
            queue.append((feat, seg))
        out.append(labels_to_mask(seg, patch_size, out_size))
    return np.stack(out)
