"""Copy detection with frozen ViT features (the DINO paper's Copydays evaluation).

The reference ``eval_copy_detection.py`` describes an image (resized to a square of 320 px,
bicubic) by the last block's normalised tokens: the CLS token concatenated with the
generalised-mean (GeM, Radenovic et al. 2018) pool of the patch tokens with exponent 4. The
descriptors are PCA-whitened (mean-centred, projected on the covariance's eigenvectors and
divided by the square roots of the eigenvalues; learned on a separate image set, 20k
YFCC100M images in the paper) and l2-normalised; each query then ranks the database
(originals and distractors) by cosine similarity, and AP is computed over the top 20 with the
query's originals as the positives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

from dino_core.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from dino_core.eval.ranking import average_precision
from dino_core.models.backbone import is_vit

IMSIZE = 320  # the reference's --imsize (with ViT-B/8)
TOP_K = 20  # the reference scores the 20 nearest database images of each query


def copydetect_transform(imsize: int = IMSIZE) -> T.Compose:
    """PIL image -> ``(3, imsize, imsize)``: a bicubic resize to a square (aspect not kept,
    as the reference), normalised."""
    return T.Compose([T.Resize((imsize, imsize), interpolation=T.InterpolationMode.BICUBIC),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))])


def gem(tokens: torch.Tensor, p: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over tokens: ``(mean_n clamp(x, eps)^p)^(1/p)``, ``(B, N, D) -> (B, D)``.

    The clamp makes the power defined for negative activations, as in the reference."""
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


@torch.no_grad()
def copy_descriptor(vit: nn.Module, x: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """CLS token and GeM-pooled patch tokens of the last block (after the final norm),
    concatenated: ``(B, 3, H, W) -> (B, 2 * D)``.

    Raises:
        ValueError: ``vit`` is not a ViT (a ResNet has no CLS and patch tokens; the reference
            supports ViTs only).
    """
    if not is_vit(vit):
        raise ValueError(f"copy detection needs a ViT's CLS and patch tokens; got "
                         f"{type(vit).__name__} (a ResNet-50 can be evaluated by retrieval)")
    model: Any = vit
    tokens = model.forward_features(x)  # (B, prefix + h * w, D), normalised
    prefix = model.num_prefix_tokens
    return torch.cat([tokens[:, 0], gem(tokens[:, prefix:], p)], dim=1).float()


@torch.no_grad()
def copy_descriptors(vit: nn.Module, batches: Iterable[torch.Tensor],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Descriptors ``(N, 2 * D)`` of batches of transformed images (not yet whitened)."""
    was_training = vit.training
    vit.eval()
    out = [copy_descriptor(vit, x.to(device)).cpu() for x in batches]
    vit.train(was_training)
    if not out:
        raise ValueError("no images to describe")
    return torch.cat(out)


class Whitening:
    """PCA whitening learned on descriptors ``(N, D)``.

    As the reference's ``PCA(whit=0.5)``: eigenvalues below ``1e-5`` of the largest are raised
    to that floor, components are sorted by decreasing eigenvalue and each is divided by the
    square root of its eigenvalue. Unlike the reference, the covariance is that of the
    *centred* training descriptors (the reference centres the data it whitens but takes the
    second-moment matrix of the uncentred training set), so the whitened training set has
    identity covariance. ``dim`` None keeps ``min(D, N - 1)`` components: with fewer images
    than dimensions the others carry no variance, only noise amplified by the floor.
    """

    def __init__(self, features: torch.Tensor, dim: int | None = None) -> None:
        x = features.double()
        n, d = x.shape
        if n < 2:
            raise ValueError(f"whitening needs at least 2 descriptors, got {n}")
        self.mean = x.mean(dim=0)
        xc = (x - self.mean).numpy()
        evals, evecs = np.linalg.eigh(xc.T @ xc / n)
        evals = np.maximum(evals, evals.max() * 1e-5)
        keep = dim if dim is not None else min(d, n - 1)
        if not 1 <= keep <= d:
            raise ValueError(f"whitening dim must be in [1, {d}], got {keep}")
        order = np.argsort(evals)[::-1][:keep]
        self.energy = float(evals[order].sum() / evals.sum())  # share of the variance kept
        proj = np.diag(evals[order] ** -0.5) @ evecs[:, order].T  # (keep, D)
        self.proj = torch.from_numpy(proj)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """``(M, D) -> (M, keep)`` float32 (not normalised)."""
        return ((features.double() - self.mean) @ self.proj.T).float()


def copy_detection_map(queries: torch.Tensor, database: torch.Tensor,
                       positives: Sequence[Sequence[int]], top_k: int = TOP_K
                       ) -> tuple[float, np.ndarray]:
    """mAP of copy detection: each query ranks the database by cosine similarity, and AP is
    taken over the ``top_k`` nearest with all of its positives as the recall denominator.

    Args:
        queries: ``(Q, D)`` and database ``(M, D)`` descriptors, l2-normalised here.
        positives: per query the database indices of its originals.

    Returns:
        ``(mAP, ap per query (Q,))``.
    """
    if len(positives) != len(queries):
        raise ValueError(f"{len(positives)} positive lists for {len(queries)} queries")
    sim = F.normalize(queries, dim=1) @ F.normalize(database, dim=1).T
    idx = sim.topk(min(top_k, sim.shape[1]), dim=1).indices.numpy()
    aps = np.array([average_precision(np.flatnonzero(np.isin(row, list(pos))), len(pos))
                    for row, pos in zip(idx, positives)])
    return float(aps.mean()), aps
