"""What an embedding is: the backbone's features of the evaluation view of each image.

The view is the k-NN evaluation's (``dino eval knn``, ``service.evaluate.knn``): the image
decoded at full resolution by ``load_rgb``, ``eval_transform(side)`` (the shorter side resized
to ``side * 256 / 224`` with bicubic interpolation, a centre crop of ``side``, ImageNet mean
and std), the side being ``--image-size``, else the run's ``eval.image_size``, else 224
(``service.models.backbones.eval_image_size``, the evaluations' rule).
The transform is cut in two (``split_transform``): the uint8 crop is made in the decode
task, the scaling and normalisation beside the backbone, so only uint8 pixels travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision.transforms.v2 as T
from torch import nn

from dino_core.augment.per_image import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from dino_core.models.backbone import is_vit
from service.errors import ConfigError

FEATURES = ("cls", "cls+mean", "patch")
RESIZE_RATIO = 256 / 224  # eval_transform's: the shorter side before the centre crop


@dataclass(frozen=True)
class EmbedSpec:
    """The settings of an embedding job, all stored in its manifest.

    Attributes:
        checkpoint: what ``--checkpoint`` named (a run, a checkpoint, a backbone file).
        weights: ``teacher``, ``student`` or ``random`` (``load_backbone``'s).
        features: ``cls``: the l2-normalised CLS feature, as ``dino eval knn``'s;
            ``cls+mean``: the CLS feature and the mean patch token concatenated, then
            l2-normalised; ``patch``: the patch tokens of the last block after the final
            norm (``(h * w, D)``, row-major over the grid), not normalised, in float16.
        image_size: the side of the centre crop.
        dim: the width of one vector (``patch``: of one token).
        grid: ``(h, w)`` of the patch grid (``patch`` only).
        classes: the class names labels index (empty: unlabelled).
    """

    checkpoint: str
    weights: str
    features: str
    image_size: int
    dim: int
    grid: tuple[int, int] | None = None
    classes: tuple[str, ...] = field(default=())

    @property
    def dtype(self) -> str:
        return "float16" if self.features == "patch" else "float32"

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] if self.grid else 1

    @property
    def row_values(self) -> int:
        """Numbers in one row's ``embedding``."""
        return self.tokens * self.dim

    def settings(self) -> dict[str, Any]:
        """The manifest's ``settings``: every other preprocessing choice."""
        out: dict[str, Any] = {
            "weights": self.weights, "resize": int(self.image_size * RESIZE_RATIO),
            "interpolation": "bicubic", "crop": "center", "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "decode": "full resolution, EXIF orientation applied",
            "normalize": "none" if self.features == "patch" else "l2",
            "classes": list(self.classes)}
        if self.grid:
            out["grid"] = list(self.grid)
            out["layout"] = "row-major (h, w, dim), flattened"
        return out

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> EmbedSpec:
        s = manifest.get("settings") or {}
        grid = tuple(s["grid"]) if s.get("grid") else None
        return cls(manifest["checkpoint"], s.get("weights", "teacher"), manifest["features"],
                   int(manifest["image_size"]), int(manifest["dim"]),
                   grid,  # type: ignore[arg-type]
                   tuple(s.get("classes") or ()))


def check_features(features: str) -> str:
    if features not in FEATURES:
        raise ConfigError(f"--features must be one of {', '.join(FEATURES)}, got {features!r}")
    return features


def build_spec(checkpoint: str, weights: str, features: str, side: int, model: nn.Module,
               classes: tuple[str, ...] = ()) -> EmbedSpec:
    """The spec of ``model`` at ``side``: its widths read off one forward of a blank image.

    Raises:
        ConfigError: ``cls+mean`` or ``patch`` of a backbone without patch tokens.
    """
    from service.embed.features import embed_batch

    if features != "cls" and not is_vit(model):
        raise ConfigError(f"--features {features} needs a ViT's patch tokens; "
                          f"{type(model).__name__} has none (use --features cls)")
    with torch.no_grad():
        out = embed_batch(model, torch.zeros(1, 3, side, side), features)
    grid = None
    if features == "patch":
        p = model.patch_embed.patch_size  # type: ignore[union-attr]
        grid = (side // p[0], side // p[1])
    return EmbedSpec(checkpoint, weights, features, side, int(out.shape[-1]), grid, classes)


def split_transform(side: int) -> tuple[T.Compose, T.Compose]:
    """``eval_transform(side)`` cut in two: PIL image -> uint8 ``(3, side, side)`` crop, and
    uint8 ``(B, 3, side, side)`` -> normalised float32. Together they are the evaluation's
    transform, step for step."""
    steps = eval_transform(side).transforms
    cut = next(i for i, t in enumerate(steps) if isinstance(t, T.ToDtype))
    return T.Compose(steps[:cut]), T.Compose(steps[cut:])
