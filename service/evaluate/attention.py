"""Attention and PCA pictures of a checkpoint's backbone, and its attention-mask Jaccard score
(the storage and file layer around ``dino_core.eval.attention``, its pictures in
``dino_core.eval.attention_display``, and ``dino_core.eval.pca``)."""

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
from dino_core.eval.attention_display import display_factor, enlarge, fit
from dino_core.eval.pca import pca_rgb
from service import data, storage
from service.config import DinoConfig
from service.errors import DataError
from service.evaluate.backbone import load_backbone


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


# No picture written (nor the network input) has a side longer than this unless asked: a
# 10000x10 image once became 1,120,010 px wide pictures (~390 MB, 3 minutes).
DEFAULT_MAX_SIDE = 1024


def fit_size(width: int, height: int, patch: int, image_size: int | None,
             max_side: int) -> tuple[int, int] | None:
    """The size the network input is resized to, or None to keep the image as it is (then only
    cropped to multiples of the patch, as the reference does).

    The shorter side goes to ``image_size`` if given, then the whole image shrinks until its
    longer side is at most ``max_side``; the sides are then rounded down to multiples of the
    patch, and never below one patch (a very thin image is stretched to one patch across).
    """
    if max_side < patch:
        raise ValueError(f"--max-side {max_side} is smaller than one patch of the backbone "
                         f"({patch} px); use at least {patch}")
    w, h = float(width), float(height)
    if image_size is not None:
        w, h = w * image_size / min(width, height), h * image_size / min(width, height)
    if max(w, h) > max_side:
        w, h = w * max_side / max(w, h), h * max_side / max(w, h)
    if (w, h) == (width, height) and min(width, height) >= patch:
        return None
    return max(patch, int(w) // patch * patch), max(patch, int(h) // patch * patch)


def bounded_grid(image: np.ndarray, attn: torch.Tensor, max_side: int) -> Image.Image:
    """The image and its heat maps as one picture of at most ``max_side`` per side: one row
    when it fits, else the layout with the shortest longer side, shrunk to fit."""
    tiles = attn.shape[0] + 1
    height, width = image.shape[:2]
    ncols = tiles
    if tiles * width > max_side:
        ncols = min(range(1, tiles + 1),
                    key=lambda c: max(c * width, math.ceil(tiles / c) * height))
    return fit(attention_grid(image, attn, ncols), max_side)


def _note(resized: dict | None, factor: int, image_size: int | None, max_side: int,
          patch: int) -> str | None:
    """One line saying how the input was resized and the pictures enlarged, if they were."""
    parts = []
    if resized is not None:
        (w0, h0), (w1, h1) = resized["from"], resized["to"]
        why = f"--image-size {image_size}, " if image_size is not None else ""
        parts.append(f"resized {w0}x{h0} to {w1}x{h1} ({why}--max-side {max_side}, sides "
                     f"multiples of the {patch} px patch)")
    if factor > 1:
        parts.append(f"pictures enlarged {factor}x for viewing (at most --max-side {max_side})")
    return "attention: " + "; ".join(parts) if parts else None


def attention_pictures(
    checkpoint: str,
    out_dir: str | Path,
    image: str | None = None,
    procedural_index: int | None = None,
    image_size: int | None = None,
    keep: float = 0.6,
    which: str = "teacher",
    max_side: int = DEFAULT_MAX_SIDE,
) -> dict[str, Any]:
    """Writes the last block's per-head attention of one image as pictures.

    Files in ``out_dir``: ``image.png`` (the network input: the image resized as
    :func:`fit_size` says, else cropped to a multiple of the patch size),
    ``attn-head{i}.png`` (heat-map overlays), ``attn-grid.png`` (image + all heads),
    ``mask-head{i}.png`` (the ``keep``-mass masks, 0/255) and ``pca.png`` (first 3 principal
    components of the patch tokens as RGB). None has a side longer than ``max_side``.

    Args:
        checkpoint: checkpoint dir/URL or exported backbone file.
        out_dir: local output folder.
        image: image path or URL; or
        procedural_index: sample ``N`` of the run's procedural validation set, which also
            scores each head's mask against the object's ground truth.
        image_size: shorter side the image is resized to (None: its own, within ``max_side``).
        keep: attention mass kept in the masks (paper: 0.6).
        which: ``teacher``, ``student`` or ``random`` (see ``load_backbone``).
        max_side: the longest side of the network input (see :func:`fit_size`) and of every
            picture (small images are enlarged for viewing up to it, not past it).

    Returns:
        ``{"paths": [...], "heads", "patch_size", "height", "width", "resized" ({"from":
        [w, h], "to": [w, h]} or None), "display_scale", "note" (a line, or None)}`` plus,
        for a procedural image, ``"image_jaccard": [per head]``.
    """
    if (image is None) == (procedural_index is None):
        raise ValueError("give exactly one of an image or a procedural index")
    model, cfg = load_backbone(checkpoint, which)
    p = vit_patch_size(model)
    gt = None
    if image is not None:
        picture = read_image(image, min(image_size or max_side, max_side))
    else:
        picture, _, gt = procedural_set(cfg, procedural_index + 1).sample(procedural_index)
    size = fit_size(picture.width, picture.height, p, image_size, max_side)
    resized = None
    if size is not None:
        resized = {"from": list(picture.size), "to": list(size)}
        picture = picture.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        if gt is not None:
            gt = np.asarray(Image.fromarray(gt).resize(size, Image.Resampling.NEAREST))
    x, rgb = prepare_image(picture, p)
    attn = attention_maps(model, x)  # (heads, h, w)
    masks = attention_masks(attn, keep, p).numpy()  # (heads, H, W)
    height, width = rgb.shape[:2]
    factor = display_factor(height, width, max_side)
    paths = _write(Path(out_dir), rgb, attn, masks, pca_rgb(model, x), factor, max_side)
    res: dict[str, Any] = {
        "paths": paths,
        "heads": int(attn.shape[0]),
        "patch_size": p,
        "height": height,
        "width": width,
        "resized": resized,
        "display_scale": factor,
        "note": _note(resized, factor, image_size, max_side, p),
    }
    if gt is not None:
        target = np.asarray(gt)[:height, :width]
        res["image_jaccard"] = [jaccard(m, target) for m in masks]
    return res


def _write(out: Path, rgb: np.ndarray, attn: torch.Tensor, masks: np.ndarray,
           pca: Image.Image, factor: int, max_side: int) -> list[str]:
    """Saves the pictures of one image, each enlarged ``factor`` times; returns their paths."""
    big = np.asarray(enlarge(Image.fromarray(rgb), factor, Image.Resampling.BICUBIC))
    out.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, Image.Image] = {"image.png": Image.fromarray(big)}
    for i, a in enumerate(attn):
        pictures[f"attn-head{i}.png"] = heatmap_overlay(big, a)
        mask = Image.fromarray(masks[i].astype(np.uint8) * 255)
        pictures[f"mask-head{i}.png"] = enlarge(mask, factor, Image.Resampling.NEAREST)
    pictures["attn-grid.png"] = bounded_grid(big, attn, max_side)
    pictures["pca.png"] = enlarge(pca, factor, Image.Resampling.NEAREST)
    paths = []
    for name, pic in pictures.items():
        pic.save(out / name)
        paths.append(str(out / name))
    return paths


def jaccard_report(
    checkpoint: str, n: int, image_size: int | None = None, keep: float = 0.6,
    which: str = "teacher",
) -> dict[str, Any]:
    """Mean Jaccard of each head's ``keep``-mass mask with the object masks of the first ``n``
    images of the run's procedural validation set (the paper's Table 7 protocol)."""
    model, cfg = load_backbone(checkpoint, which)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return mask_jaccard_over_dataset(model, procedural_set(cfg, n), n, image_size, keep)
