"""DAVIS region similarity J and boundary accuracy F (Perazzi et al., CVPR 2016), as the
DAVIS 2017 toolkit (``davis2017-evaluation``) computes them for the semi-supervised task.

J is the Jaccard index of one object's predicted and true masks in one frame; F is the
F-measure of its boundary pixels, a boundary pixel counting as matched when the other
boundary passes within ``ceil(bound_th * diagonal)`` pixels (a disk). Per object, both are
averaged over every frame except the first (given) and the last, as the toolkit does; the
summary means are over all objects of all videos. Pure numpy: no OpenCV, scipy or
scikit-image (the toolkit's ``cv2.dilate`` with a ``skimage.morphology.disk`` is a plain
shifted OR here).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

BOUND_TH = 0.008  # the toolkit's tolerance: 0.8% of the image diagonal


def region_jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    """J of two boolean masks ``(H, W)``; 1 when both are empty (the toolkit's rule)."""
    gt, pred = _pair(gt, pred)
    union = np.logical_or(gt, pred).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(gt, pred).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundaries of a boolean mask ``(H, W)`` (Martin et al.'s ``seg2bmap``).

    A pixel is on the boundary when it differs from its right, lower or lower-right
    neighbour; in the last row only the right neighbour counts, in the last column only the
    lower one, and the bottom-right pixel never is.
    """
    seg = np.asarray(mask).astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {seg.shape}")
    east, south, south_east = (np.zeros_like(seg) for _ in range(3))
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


def disk(radius: int) -> np.ndarray:
    """Boolean disk ``(2r + 1, 2r + 1)``: the offsets with ``dy^2 + dx^2 <= r^2``
    (``skimage.morphology.disk``)."""
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= r**2


def dilate(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary dilation by a centred footprint, pixels outside the image counting as off."""
    mask = np.asarray(mask, dtype=bool)
    fh, fw = footprint.shape
    ry, rx = fh // 2, fw // 2
    h, w = mask.shape
    padded = np.zeros((h + 2 * ry, w + 2 * rx), dtype=bool)
    padded[ry : ry + h, rx : rx + w] = mask
    out = np.zeros_like(mask)
    for dy, dx in zip(*np.nonzero(footprint)):
        out |= padded[dy : dy + h, dx : dx + w]
    return out


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F of the boundaries of two boolean masks ``(H, W)``.

    Args:
        bound_th: match tolerance; below 1 a fraction of the image diagonal (rounded up to
            whole pixels), else a number of pixels.

    Returns:
        ``2 P R / (P + R)`` with P the share of predicted boundary pixels near the true
        boundary and R the share of true boundary pixels near the predicted one; with an
        empty boundary on one side the toolkit's conventions (both empty: 1).
    """
    gt, pred = _pair(gt, pred)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 or n_gt == 0:
        return 1.0 if n_pred == n_gt else 0.0  # P=1,R=0 or P=0,R=1 give F=0
    footprint = disk(int(radius))
    precision = (pred_b & dilate(gt_b, footprint)).sum() / n_pred
    recall = (gt_b & dilate(pred_b, footprint)).sum() / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def video_scores(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> dict:
    """Per-object J and F of one video, each averaged over frames ``1 .. T-2``.

    Args:
        gt: true instance masks ``(T, H, W)``, 0 background, 1..n objects (n = the largest id
            of the first frame, as the toolkit); 255 (DAVIS's "void") counts as background.
        pred: predicted instance masks, same shape.

    Returns:
        ``{"j": [J of object 1, ...], "f": [F of object 1, ...]}`` in [0, 1].
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"masks must be (T, H, W) and alike, got {gt.shape} and {pred.shape}")
    if len(gt) < 3:
        raise ValueError(f"a video needs at least 3 frames (the first and last are not "
                         f"scored), got {len(gt)}")
    gt = np.where(gt == 255, 0, gt)
    n_objects = int(gt[0].max())
    j, f = [], []
    for obj in range(1, n_objects + 1):
        frames = range(1, len(gt) - 1)
        j.append(float(np.mean([region_jaccard(gt[t] == obj, pred[t] == obj) for t in frames])))
        f.append(float(np.mean([boundary_f(gt[t] == obj, pred[t] == obj, bound_th)
                                for t in frames])))
    return {"j": j, "f": f}


def summarize(per_video: Iterable[dict]) -> dict[str, float]:
    """J-mean, F-mean and J&F-mean in percent (the paper's 0-100 scale) over every object of
    every video (each object weighs the same, as in the toolkit), from :func:`video_scores`."""
    videos = list(per_video)
    j = [x for v in videos for x in v["j"]]
    f = [x for v in videos for x in v["f"]]
    if not j:
        raise ValueError("no object to score: every first frame is empty")
    j_mean, f_mean = 100 * float(np.mean(j)), 100 * float(np.mean(f))
    return {"j": j_mean, "f": f_mean, "jf": (j_mean + f_mean) / 2, "n_objects": len(j)}


def _pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt).astype(bool), np.asarray(pred).astype(bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} vs {pred.shape}")
    return gt, pred
