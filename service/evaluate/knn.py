"""Weighted k-NN evaluation of a backbone on labeled train/val splits (the paper's Table 2
protocol: l2-normalised CLS features, T=0.07, k in {10, 20, 100, 200})."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dino_core import knn_classify
from dino_core.augment import eval_transform
from dino_core.eval import extract_features
from service import data
from service.config import DinoConfig, parse_source
from service.evaluate.backbone import load_backbone


def labeled_split(path: str, image_size: int, cfg: DinoConfig | None, train: bool,
           transform: Callable | None = None):
    """A labeled split (``procedural``, a folder or a URL) with the eval transform, or
    ``transform``; the procedural set is the run's (``cfg``), on the split's own seed."""
    cfg = cfg or DinoConfig()
    seed = cfg.data.seed + (data.EVAL_TRAIN_SEED_OFFSET if train else data.EVAL_VAL_SEED_OFFSET)
    size = cfg.eval.procedural_train_size if train else cfg.eval.procedural_val_size
    return data.open_images(parse_source(path), transform or eval_transform(image_size), size,
                            seed, cfg)


def knn_eval(checkpoint: str, train_path: str, val_path: str, image_size: int = 224,
             ks: list[int] | tuple[int, ...] = (10, 20, 100, 200), temperature: float = 0.07,
             batch_size: int = 128, num_workers: int = 2, dump: str | None = None,
             load: str | None = None, which: str = "teacher") -> dict[str, Any]:
    """Weighted k-NN of the teacher backbone's l2-normalised CLS features."""
    if load:
        feats = torch.load(load)
    else:
        model, cfg = load_backbone(checkpoint, which)
        feats = {}
        for name, path in (("train", train_path), ("val", val_path)):
            ds = labeled_split(path, image_size, cfg, name == "train")
            f, y = extract_features(model, data.eval_loader(ds, batch_size, num_workers))
            feats[name] = {"features": f, "labels": y}
        if dump:
            torch.save(feats, dump)
    tr, va = feats["train"], feats["val"]
    num_classes = int(max(tr["labels"].max(), va["labels"].max())) + 1
    res = knn_classify(tr["features"], tr["labels"], va["features"], va["labels"], ks=ks,
                       temperature=temperature, num_classes=num_classes)
    k_main = 20 if 20 in res else ks[0]
    return {"top1": res[k_main]["top1"], "top5": res[k_main]["top5"], "k": k_main,
            "by_k": {str(k): v for k, v in res.items()}, "n_train": len(tr["labels"]),
            "n_val": len(va["labels"]), "num_classes": num_classes}
