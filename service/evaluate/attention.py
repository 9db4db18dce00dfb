"""Attention and PCA pictures of a checkpoint's backbone, and its attention-mask Jaccard score
(the storage and file layer around ``dino_core.eval.attention`` and ``dino_core.eval.pca``)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dino_core.data.folder import load_rgb
from dino_core.data.procedural import ProceduralShapes
from dino_core.eval.attention import (
    attention_grid,
    attention_maps,
    attention_masks,
    heatmap_overlay,
    jaccard,
    mask_jaccard_over_dataset,
    prepare_image,
    vit_patch_size,
)
from dino_core.eval.pca import pca_rgb
from service import data, storage
from service.config import DinoConfig
from service.errors import DataError
from service.evaluate.backbone import load_backbone

# Pictures of smaller images are enlarged by an integer factor up to this side, so a 48 px
# procedural image and its 6x6 attention grid are readable; the maps are computed unscaled.
DISPLAY_MIN_SIDE = 224


def procedural_set(cfg: DinoConfig | None, length: int) -> ProceduralShapes:
    """The run's procedural generator on the seed of its validation split (images it never
    trained on), with the run's image size, classes and difficulty."""
    d = (cfg or DinoConfig()).data
    return ProceduralShapes(
        length,
        d.procedural_image_size,
        d.procedural_classes,
        d.seed + data.EVAL_VAL_SEED_OFFSET,
        difficulty=d.procedural_difficulty, colourful=d.procedural_colourful,
    )


def read_image(uri: str, size_hint: int | None = None) -> Image.Image:
    """An RGB image from a local path or an fsspec URL (s3://, gs://, http(s)://); a large
    JPEG is decoded at a reduced scale that keeps both sides >= ``size_hint``."""
    if storage.is_local(uri):
        source: str | io.BytesIO = uri.removeprefix("file://")
        if not Path(source).is_file():
            raise FileNotFoundError(f"no image file {uri}")
    else:
        fs, path = storage.get_fs(uri)
        source = io.BytesIO(storage.with_retries(lambda: fs.cat_file(path), f"download of {uri}"))
    try:
        return load_rgb(source, size_hint)
    except Exception as err:  # noqa: BLE001 - decoders raise many types
        raise DataError(f"{uri} is not a readable image ({type(err).__name__}: {err})") from err


def _enlarge(picture: Image.Image, factor: int, resample: Image.Resampling) -> Image.Image:
    if factor == 1:
        return picture
    return picture.resize((picture.width * factor, picture.height * factor), resample)


def attention_pictures(
    checkpoint: str,
    out_dir: str | Path,
    image: str | None = None,
    procedural_index: int | None = None,
    image_size: int | None = None,
    keep: float = 0.6,
    which: str = "teacher",
) -> dict[str, Any]:
    """Writes the last block's per-head attention of one image as pictures.

    Files in ``out_dir``: ``image.png`` (the input, cropped to a multiple of the patch size),
    ``attn-head{i}.png`` (heat-map overlays), ``attn-grid.png`` (image + all heads),
    ``mask-head{i}.png`` (the ``keep``-mass masks, 0/255) and ``pca.png`` (first 3 principal
    components of the patch tokens as RGB).

    Args:
        checkpoint: checkpoint dir/URL or exported backbone file.
        out_dir: local output folder.
        image: image path or URL; or
        procedural_index: sample ``N`` of the run's procedural validation set, which also
            scores each head's mask against the object's ground truth.
        image_size: shorter side the image is resized to (None: as it is).
        keep: attention mass kept in the masks (paper: 0.6).
        which: ``teacher``, ``student`` or ``random`` (see ``load_backbone``).

    Returns:
        ``{"paths": [...], "heads", "patch_size", "height", "width"}`` plus, for a procedural
        image, ``"image_jaccard": [per head]``.
    """
    if (image is None) == (procedural_index is None):
        raise ValueError("give exactly one of an image or a procedural index")
    model, cfg = load_backbone(checkpoint, which)
    p = vit_patch_size(model)
    gt = None
    if image is not None:
        picture = read_image(image, image_size)
    else:
        picture, _, gt = procedural_set(cfg, procedural_index + 1).sample(procedural_index)
    x, rgb = prepare_image(picture, p, image_size)
    attn = attention_maps(model, x)  # (heads, h, w)
    masks = attention_masks(attn, keep, p).numpy()  # (heads, H, W)
    height, width = rgb.shape[:2]

    factor = max(1, math.ceil(DISPLAY_MIN_SIDE / min(height, width)))
    big = np.asarray(_enlarge(Image.fromarray(rgb), factor, Image.Resampling.BICUBIC))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, Image.Image] = {"image.png": Image.fromarray(big)}
    for i, a in enumerate(attn):
        pictures[f"attn-head{i}.png"] = heatmap_overlay(big, a)
        mask = Image.fromarray(masks[i].astype(np.uint8) * 255)
        pictures[f"mask-head{i}.png"] = _enlarge(mask, factor, Image.Resampling.NEAREST)
    pictures["attn-grid.png"] = attention_grid(big, attn)
    pictures["pca.png"] = _enlarge(pca_rgb(model, x), factor, Image.Resampling.NEAREST)
    paths = []
    for name, pic in pictures.items():
        pic.save(out / name)
        paths.append(str(out / name))
    res: dict[str, Any] = {
        "paths": paths,
        "heads": int(attn.shape[0]),
        "patch_size": p,
        "height": height,
        "width": width,
    }
    if gt is not None:
        target = _gt_like(gt, picture, image_size, rgb)
        res["image_jaccard"] = [jaccard(m, target) for m in masks]
    return res


def _gt_like(
    gt: np.ndarray, picture: Image.Image, image_size: int | None, rgb: np.ndarray
) -> np.ndarray:
    """The ground-truth mask resized and cropped exactly as ``prepare_image`` did the image."""
    mask = Image.fromarray(gt)
    if image_size is not None:
        scale = image_size / min(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return np.asarray(mask)[: rgb.shape[0], : rgb.shape[1]]


def jaccard_report(
    checkpoint: str, n: int, image_size: int | None = None, keep: float = 0.6,
    which: str = "teacher",
) -> dict[str, Any]:
    """Mean Jaccard of each head's ``keep``-mass mask with the object masks of the first ``n``
    images of the run's procedural validation set (the paper's Table 7 protocol)."""
    model, cfg = load_backbone(checkpoint, which)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return mask_jaccard_over_dataset(model, procedural_set(cfg, n), n, image_size, keep)
