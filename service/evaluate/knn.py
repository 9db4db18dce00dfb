"""Weighted k-NN evaluation of a backbone on labeled train/val splits (the paper's Table 2
protocol: l2-normalised CLS features, T=0.07, k in {10, 20, 100, 200})."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from dino_core import knn_classify
from dino_core.augment.per_image import eval_transform
from dino_core.eval import extract_features
from service import data
from service.config import DinoConfig, parse_source
from service.evaluate.backbone import load_backbone
from service.evaluate.settings import describe, eval_settings
from service.models.backbones import eval_image_size

log = logging.getLogger(__name__)


def labeled_split(path: str, image_size: int, cfg: DinoConfig | None, train: bool,
                  transform: Callable | None = None):
    """A labeled split (``procedural``, a folder or a URL) with the eval transform, or
    ``transform``; the procedural set is the run's (``cfg``), on the split's own seed."""
    return data.eval_split(cfg or DinoConfig(), parse_source(path), train,
                           transform or eval_transform(image_size))


def split_features(model: torch.nn.Module, train_path: str, val_path: str, image_size: int,
                   cfg: DinoConfig, batch_size: int, num_workers: int) -> dict[str, Any]:
    """``{"train"|"val": {"features", "labels"}, "image_size"}`` of the two labeled splits,
    their classes matched by name."""
    splits = {name: labeled_split(path, image_size, cfg, name == "train")
              for name, path in (("train", train_path), ("val", val_path))}
    data.align_classes(splits["train"], splits["val"])  # by name; labeled, or an error
    feats: dict[str, Any] = {}
    for name, ds in splits.items():
        f, y = extract_features(model, data.eval_loader(ds, batch_size, num_workers))
        feats[name] = {"features": f, "labels": y}
    feats["image_size"] = image_size
    return feats


def knn_eval(checkpoint: str, train_path: str, val_path: str, image_size: int | None = None,
             ks: list[int] | tuple[int, ...] = (10, 20, 100, 200), temperature: float = 0.07,
             batch_size: int = 128, num_workers: int = 2, dump: str | None = None,
             load: str | None = None, which: str = "teacher", preset: str | None = None,
             config_file: str | None = None,
             overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Weighted k-NN of the teacher backbone's l2-normalised CLS features.

    ``image_size`` None: the settings' ``eval.image_size``. The settings (procedural set,
    image size) are ``preset``/``config_file`` if given, else the checkpoint's, else the
    defaults, with ``overrides`` on top (``service.evaluate.settings``); ``data`` in the
    result says which in a ``note`` line. Folder splits are matched by class name. Raises
    DataError for a split without class folders or splits with no class in common,
    ValueError for a bad ``ks``, ConfigError for an ``image_size`` below one patch.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"--k must be at least 1, got {list(ks)}")
    if load:
        feats = torch.load(load)
        used = {"from": "features", "note": f"k-NN on the features saved in {load} (image "
                                            f"size {feats.get('image_size')})"}
    else:
        model, file_cfg = load_backbone(checkpoint, which)
        settings = eval_settings(checkpoint, file_cfg, preset, config_file, overrides)
        size = eval_image_size(image_size, settings.cfg, model)
        used = describe("k-NN", settings, train_path, val_path, size, image_size is not None)
        feats = split_features(model, train_path, val_path, size, settings.cfg, batch_size,
                               num_workers)
        if dump:
            torch.save(feats, dump)
    tr, va = feats["train"], feats["val"]
    num_classes = int(max(tr["labels"].max(), va["labels"].max())) + 1
    res = knn_classify(tr["features"], tr["labels"], va["features"], va["labels"], ks=ks,
                       temperature=temperature, num_classes=num_classes)
    k_main = 20 if 20 in res else ks[0]
    return {"top1": res[k_main]["top1"], "top5": res[k_main]["top5"], "k": k_main,
            "by_k": {str(k): v for k, v in res.items()}, "n_train": len(tr["labels"]),
            "n_val": len(va["labels"]), "num_classes": num_classes,
            "image_size": feats.get("image_size"), "data": used}
