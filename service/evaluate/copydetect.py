"""Copy detection of a checkpoint's ViT (``dino_core.eval.copydetect``) on the procedural
copies or on a Copydays folder (``original/``, ``strong/``; distractors and whitening images
from folders of their own)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dino_core.data.copydays import ProceduralCopydays, image_files, read_copydays
from dino_core.data.folder import load_rgb
from dino_core.eval.copydetect import (
    IMSIZE,
    TOP_K,
    Whitening,
    copy_descriptors,
    copy_detection_map,
    copydetect_transform,
)
from dino_core.models.backbone import is_vit
from service.evaluate.backbone import load_backbone
from service.evaluate.retrieval import default_image_size, device_or_default, local_folder


def _batches(images: Sequence[Image.Image | Path], tf, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        yield torch.stack([tf(im if isinstance(im, Image.Image) else load_rgb(im))
                           for im in chunk])


def copydetect_eval(checkpoint: str, data: str = "procedural", distractors: str | None = None,
                    whitening: str | None = None, whiten: bool = True, which: str = "teacher",
                    image_size: int | None = None, batch_size: int = 16,
                    num_originals: int = 20, copies: int = 2, num_distractors: int = 40,
                    seed: int = 0, top_k: int = TOP_K,
                    device: str | None = None) -> dict[str, Any]:
    """mAP (in percent) of finding each edited copy's original among originals + distractors.

    ``data``: ``procedural`` (:class:`ProceduralCopydays`: ``num_originals`` originals with
    ``copies`` strong copies each and ``num_distractors`` distractors; whitening learned on
    the distractors) or a local Copydays folder; its distractors come from ``distractors``
    (default ``<data>/distractors`` if present) and the whitening from ``whitening`` (default:
    the distractors). Without whitening images, or with ``whiten`` False, descriptors are
    only l2-normalised. ``image_size``: the square side (default 320, the reference's; for
    the procedural set the run's ``eval.image_size``).

    Returns:
        ``map`` (the ``strong`` block), ``by_block`` for every block present, the sizes and
        whether descriptors were whitened.

    Raises:
        ValueError: the backbone is not a ViT, or bad sizes.
    """
    if batch_size < 1 or top_k < 1:
        raise ValueError(f"batch_size and top_k must be at least 1, got {batch_size}, {top_k}")
    model, cfg = load_backbone(checkpoint, which)
    if not is_vit(model):
        raise ValueError(f"copy detection needs a ViT's CLS and patch tokens, not "
                         f"{type(model).__name__}; `dino eval retrieval` takes a ResNet-50")
    procedural = data == "procedural"
    size = default_image_size(image_size, procedural, cfg, IMSIZE)
    dev = device_or_default(device)
    model.to(dev)
    tf = copydetect_transform(size)

    def describe(images: Sequence[Image.Image | Path]) -> torch.Tensor:
        return copy_descriptors(model, _batches(images, tf, batch_size), dev)

    blocks: list[tuple[str, list, list[list[int]]]]
    if procedural:
        s = ProceduralCopydays(num_originals, copies, num_distractors, seed=seed)
        originals: list = [s.original(i) for i in range(s.num_originals)]
        made = [s.query(q) for q in range(s.n_queries)]
        blocks = [("strong", [m[0] for m in made], [[m[1]] for m in made])]
        extra: list = [s.distractor(d) for d in range(s.distractors)]
        whit_images = extra
    else:
        root = local_folder(data, "--data")
        originals, qblocks = read_copydays(root)
        blocks = [(b.name, b.paths, b.positives) for b in qblocks]
        if distractors is None and (root / "distractors").is_dir():
            distractors = str(root / "distractors")
        extra = image_files(local_folder(distractors, "--distractors")) if distractors else []
        whit_images = (image_files(local_folder(whitening, "--whitening")) if whitening
                       else extra)

    database = describe(list(originals) + list(extra))
    described = [(name, describe(images), pos) for name, images, pos in blocks]
    whitened = bool(whiten and len(whit_images) >= 2)
    energy = None
    if whitened:
        w = Whitening(database[len(originals):] if whit_images is extra else describe(whit_images))
        energy = w.energy
        database = w(database)
        described = [(name, w(q), pos) for name, q, pos in described]
    by_block = {name: 100 * copy_detection_map(q, database, pos, top_k)[0]
                for name, q, pos in described}
    return {"map": by_block["strong"], "by_block": by_block,
            "n_queries": len(blocks[0][1]), "n_originals": len(originals),
            "n_distractors": len(extra), "whitened": whitened,
            "whitening_images": len(whit_images) if whitened else 0,
            "whitening_energy": energy, "image_size": size, "top_k": top_k}
