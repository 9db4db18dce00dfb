"""Image retrieval with frozen features (the DINO paper's revisited Oxford/Paris evaluation).

As the reference ``eval_image_retrieval.py``: each image is shrunk to fit ``imsize`` (aspect
kept, never enlarged), normalised, and passed through the backbone alone (batch 1, images
differ in size); with multi-scale, the CLS features at scales 1, 1/sqrt(2) and 1/2 (bilinear
resizes of the input tensor) are summed and l2-normalised (the reference's ``multi_scale``: no
power or GeM over scales, a plain sum). The gallery is ranked for each query by cosine
similarity and scored with the revisited protocol (:mod:`dino_core.eval.ranking`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from dino_core.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from dino_core.eval.ranking import revisited_map

SCALES = (1.0, 1 / math.sqrt(2), 0.5)


class Thumbnail:
    """Shrinks an image so both sides fit ``size`` (PIL's ``thumbnail``: aspect kept, never
    enlarged, antialiased), as the reference does with ``--imsize``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.copy()
        image.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
        return image


def retrieval_transform(imsize: int) -> T.Compose:
    """PIL image -> normalised float tensor ``(3, H, W)`` with ``max(H, W) <= imsize``."""
    return T.Compose([Thumbnail(imsize), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))])


def crop_box(image: Image.Image, bbx: Sequence[float] | None) -> Image.Image:
    """The query's region ``(x0, y0, x1, y1)`` (the revisitop protocol's query crop)."""
    if bbx is None:
        return image
    x0, y0, x1, y1 = (float(v) for v in bbx)
    return image.crop((int(math.floor(x0)), int(math.floor(y0)), int(math.ceil(x1)),
                       int(math.ceil(y1))))


@torch.no_grad()
def multi_scale_features(model: nn.Module, x: torch.Tensor,
                         scales: Sequence[float] = SCALES) -> torch.Tensor:
    """Sum of the backbone's features of ``x (B, 3, H, W)`` resized by each of ``scales``,
    l2-normalised per image: ``(B, D)``.

    The reference divides the sum by 3 and by the norm of the whole batch before its own
    per-image normalisation; the result is the same unit vectors.
    """
    total = None
    for s in scales:
        inp = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                             align_corners=False)
        f = model(inp).float()
        total = f if total is None else total + f
    assert total is not None, "scales must not be empty"
    return F.normalize(total, dim=1)


@torch.no_grad()
def retrieval_features(model: nn.Module, images: Iterable[torch.Tensor],
                       scales: Sequence[float] = SCALES,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """l2-normalised features ``(N, D)`` of transformed images ``(3, H, W)``, one at a time."""
    if not scales:
        raise ValueError("scales must not be empty")
    was_training = model.training
    model.eval()
    feats = [multi_scale_features(model, x.unsqueeze(0).to(device), scales).cpu()
             for x in images]
    model.train(was_training)
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats)


def rank_gallery(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Gallery ids by decreasing cosine similarity, ``(n_gallery, n_queries)`` (the
    reference's ``argsort(-sim, dim=0)`` layout); features must be l2-normalised."""
    sim = gallery @ queries.T
    return torch.argsort(-sim, dim=0, stable=True)


def evaluate_retrieval(queries: torch.Tensor, gallery: torch.Tensor,
                       gnd: Sequence[dict[str, Any]],
                       kappas: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, Any]]:
    """Ranks and scores: ``{setting: {"map", "mp_at_k", "n_queries"}}`` with settings
    ``easy``/``medium``/``hard`` for a revisited ground truth, ``all`` for ``ok`` lists."""
    if len(gnd) != len(queries):
        raise ValueError(f"{len(gnd)} ground-truth entries for {len(queries)} queries")
    return revisited_map(rank_gallery(queries, gallery).numpy(), gnd, kappas)
