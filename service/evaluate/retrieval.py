"""Image retrieval of a checkpoint's backbone (``dino_core.eval.retrieval``) on the procedural
instance set or on a revisited Oxford/Paris folder (``<root>/<dataset>/gnd_<dataset>.pkl``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_core.data.folder import load_rgb
from dino_core.data.instances import InstanceSet
from dino_core.data.roxford import RevisitedSet, load_revisited
from dino_core.eval.retrieval import (
    SCALES,
    crop_box,
    evaluate_retrieval,
    retrieval_features,
    retrieval_transform,
)
from service import storage
from service.config import DinoConfig
from service.errors import DataError
from service.evaluate.backbone import load_backbone

RETRIEVAL_IMSIZE = 224  # the reference's --imsize (its README: 224 for Oxford, 512 for Paris)


def local_folder(path: str, what: str) -> Path:
    """A local folder (``file://`` allowed); remote datasets are not read here.

    Raises:
        ValueError: a URL; FileNotFoundError: no such folder.
    """
    if not storage.is_local(path):
        raise ValueError(f"{what} must be a local folder, got {path}; copy the dataset locally")
    folder = Path(path.removeprefix("file://"))
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: no folder {folder}")
    return folder


def read_ground_truth(folder: Path, dataset: str) -> RevisitedSet:
    """``load_revisited``, whose every failure names the file: a truncated or damaged pickle
    fails inside the unpickler in many ways (EOFError, UnpicklingError, IndexError, ...).

    Raises:
        FileNotFoundError: no ground-truth file; DataError: one that does not read.
    """
    path = folder / dataset / f"gnd_{dataset}.pkl"
    try:
        return load_revisited(folder, dataset)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged pickle raises many types
        text = str(err) or type(err).__name__
        if str(path) in text:  # the layout checks name the file already
            raise DataError(text) from None
        if isinstance(err, ValueError) and "refusing to unpickle" in text:
            raise DataError(f"{path}: {text}; nothing of it was run") from None
        raise DataError(f"{path} is not a readable ground-truth pickle, truncated or damaged "
                        f"({type(err).__name__}: {text}); download it again") from None


def patch_size_of(model: nn.Module) -> int:
    return int(getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1))[0])


def default_image_size(image_size: int | None, procedural: bool, cfg: DinoConfig | None,
                       reference: int) -> int:
    """``image_size``; else for the procedural sets the run's ``eval.image_size`` (the side the
    backbone was trained for), for a real dataset the reference's side."""
    if image_size is not None:
        return image_size
    if procedural and cfg is not None:
        return cfg.eval.image_size
    return reference


def device_or_default(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def retrieval_eval(checkpoint: str, data: str = "procedural", dataset: str = "roxford5k",
                   which: str = "teacher", image_size: int | None = None,
                   scales: Sequence[float] = SCALES, crop_queries: bool = False,
                   num_instances: int = 20, renderings: int = 4, distractors: int = 20,
                   seed: int = 0, kappas: Sequence[int] = (1, 5, 10),
                   device: str | None = None) -> dict[str, Any]:
    """mAP (in percent) of ranking the gallery for each query by the backbone's CLS feature.

    ``data``: ``procedural`` (:class:`InstanceSet` of ``num_instances`` x ``renderings`` and
    ``distractors``, 64-96 px) or a local folder with ``<dataset>/gnd_<dataset>.pkl``.
    ``image_size``: images are shrunk to fit it (default: see :func:`default_image_size`, 224
    for a real dataset). ``scales``: multi-scale features (the reference's 1, 1/sqrt(2),
    1/2; ``[1]`` for single scale). ``crop_queries``: crop queries to their ``bbx`` (the
    revisitop protocol; the DINO reference does not crop, so neither does the default).

    Returns:
        ``map_easy``/``map_medium``/``map_hard`` (or ``map`` for an ``ok``-only ground truth),
        ``by_setting`` with mP@k, and the set's sizes.
    """
    if not scales or min(scales) <= 0:
        raise ValueError(f"--scales must be positive, got {list(scales)}")
    model, cfg = load_backbone(checkpoint, which)
    procedural = data == "procedural"
    size = default_image_size(image_size, procedural, cfg, RETRIEVAL_IMSIZE)
    patch = patch_size_of(model)
    if size * min(scales) < patch:
        raise ValueError(f"--image-size {size} at scale {min(scales):.3g} is smaller than one "
                         f"patch ({patch} px); use at least {int(patch / min(scales)) + 1}")
    if procedural:
        s = InstanceSet(num_instances, renderings, distractors, seed=seed)
        gnd = s.gnd()
        queries = [s.query(i) for i in range(s.n_queries)]
        gallery = [s.gallery(j) for j in range(s.n_gallery)]
        name = "procedural-instances"
    else:
        rs = read_ground_truth(local_folder(data, "--data"), dataset)
        gnd = rs.gnd
        queries = [load_rgb(rs.image_path(n)) for n in rs.qimlist]
        gallery = [load_rgb(rs.image_path(n)) for n in rs.imlist]
        name = dataset
    if crop_queries:
        queries = [crop_box(q, g.get("bbx")) for q, g in zip(queries, gnd)]
    tf, dev = retrieval_transform(size), device_or_default(device)
    model.to(dev)
    q_feats = retrieval_features(model, (tf(q) for q in queries), scales, dev)
    g_feats = retrieval_features(model, (tf(g) for g in gallery), scales, dev)
    by_setting = evaluate_retrieval(q_feats, g_feats, gnd, kappas)
    res: dict[str, Any] = {"dataset": name, "n_queries": len(queries), "n_gallery": len(gallery),
                           "image_size": size, "scales": [float(x) for x in scales],
                           "crop_queries": crop_queries}
    for setting, r in by_setting.items():
        r["map"] = 100 * r["map"]
        r["mp_at_k"] = {k: 100 * v for k, v in r["mp_at_k"].items()}
        res["map" if setting == "all" else f"map_{setting}"] = r["map"]
    res["by_setting"] = by_setting
    return res
