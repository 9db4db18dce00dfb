"""The vectors of a job for a few local image files, in this process (no Ray): what
``dino neighbours --query IMG`` compares with an embedding's rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.embed.decode import Crops
from service.embed.features import embed_batch
from service.embed.spec import EmbedSpec, split_transform
from service.errors import DataError
from service.models.backbones import load_backbone
from service.storage import read_bytes

BATCH = 64


def embed_files(manifest: dict[str, Any], paths: list[str], batch_size: int = BATCH
                ) -> np.ndarray:
    """Embeds ``paths`` with the manifest's checkpoint, weights, features and preprocessing:
    the vectors the job computes for the same files.

    Returns:
        float32 ``(len(paths), dim)``; for ``patch``, ``(len(paths), tokens * dim)`` (the
        grid flattened as in the parts).

    Raises:
        DataError: a file cannot be read or decoded (named).
    """
    spec = EmbedSpec.from_manifest(manifest)
    model, _ = load_backbone(spec.checkpoint, spec.weights)
    model.eval()
    tail = split_transform(spec.image_size)[1]
    out = np.zeros((len(paths), spec.row_values), np.float32)
    for start in range(0, len(paths), batch_size):
        crops = Crops(spec.image_size)
        for path in paths[start:start + batch_size]:
            try:
                blob = read_bytes(path)
            except OSError as err:
                raise DataError(f"cannot read {path}: {err}") from None
            crops.add(path, -1, blob)
        batch = crops.take()
        bad = [f"{k} ({e})" for k, e in zip(batch["key"], batch["error"]) if e]
        if bad:
            raise DataError(f"cannot decode {', '.join(bad)}")
        x = tail(torch.from_numpy(batch["image"]))
        vectors = embed_batch(model, x, spec.features).flatten(1)
        if spec.dtype == "float16":  # as stored in the parts
            vectors = vectors.half()
        out[start:start + len(batch["key"])] = vectors.float().numpy()
    return out
