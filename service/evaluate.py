"""Evaluations and export of a checkpoint given by URI (the storage layer around
``dino_core.eval`` and ``dino_core.export``)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dino_core import knn_classify
from dino_core.augment import eval_transform
from dino_core.eval import extract_features
from dino_core.eval.linear import linear_train_transform, train_linear
from dino_core.export import backbone_state_from_checkpoint, save_backbone
from dino_core.export import load_backbone as load_backbone_file
from dino_core.models.backbone import build_backbone
from service import checkpoint as ckpt
from service import data, storage
from service.config import DinoConfig

WEIGHTS = ("teacher", "student", "random")


def load_backbone(uri: str, which: str = "teacher") -> tuple[nn.Module, DinoConfig | None]:
    """The backbone of a checkpoint directory/URL or of an exported ``.safetensors`` file.

    ``which``: the checkpoint's ``teacher`` or ``student``, or ``random``: the same
    architecture freshly initialised (seeded by the run's ``train.seed``), the baseline a
    pretrained backbone is judged against.
    """
    if which not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {which!r}")
    if uri.endswith(".safetensors"):
        if which != "teacher":
            raise ValueError(f"an exported backbone holds only its own weights, not {which!r}")
        local = uri
        if not storage.is_local(uri):
            local = str(storage.download_file(uri, Path(tempfile.mkdtemp()) / "b.safetensors"))
        return load_backbone_file(local.removeprefix("file://")), None
    state = ckpt.load_checkpoint(uri)
    cfg = DinoConfig.model_validate(state["config"])
    meta = state["backbone_meta"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_backbone(meta["arch"], meta["patch_size"], meta["img_size"],
                               depth=meta["depth"])
    if which != "random":
        model.load_state_dict(backbone_state_from_checkpoint(state, which), strict=True)
    return model.eval(), cfg


def export_backbone(checkpoint_uri: str, out: str, which: str = "teacher") -> str:
    state = ckpt.load_checkpoint(checkpoint_uri)
    weights = backbone_state_from_checkpoint(state, which)
    if storage.is_local(out):
        save_backbone(out.removeprefix("file://"), weights, state["backbone_meta"])
        return out
    with tempfile.TemporaryDirectory() as d:
        local = save_backbone(Path(d) / "backbone.safetensors", weights, state["backbone_meta"])
        fs, path = storage.get_fs(out)
        storage.with_retries(lambda: fs.put(str(local), path), f"upload of {out}")
    return out


def _split(path: str, image_size: int, cfg: DinoConfig | None, train: bool,
           transform: Callable | None = None):
    cfg = cfg or DinoConfig()
    seed = cfg.data.seed + (data.EVAL_TRAIN_SEED_OFFSET if train else data.EVAL_VAL_SEED_OFFSET)
    size = cfg.eval.procedural_train_size if train else cfg.eval.procedural_val_size
    return data.open_images(path, transform or eval_transform(image_size), size, seed, cfg)


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
            ds = _split(path, image_size, cfg, name == "train")
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


def _num_classes(*splits: Any) -> int:
    """Classes of labeled splits (procedural sets and image folders both list ``classes``)."""
    counts = [len(getattr(ds, "classes", []) or []) for ds in splits]
    if min(counts) == 0:
        raise ValueError("the linear probe needs labeled splits: one sub-folder per class")
    return max(counts)


def linear_eval(checkpoint: str, train_path: str, val_path: str, image_size: int = 224,
                epochs: int = 100, lr: float = 0.001, batch_size: int = 256,
                n_last_blocks: int = 4, avgpool: bool = False, num_workers: int = 2,
                output_dir: str | None = None, device: str | None = None, seed: int = 0,
                on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
                which: str = "teacher", crop_scale: float = 0.08) -> dict[str, Any]:
    """Linear probe of the teacher backbone (``dino_core.eval.linear.train_linear``) on
    RandomResizedCrop + flip train views, scored on Resize + CenterCrop val views.

    ``output_dir`` (local) receives ``linear_probe.pt`` after every epoch (a rerun with the same
    directory resumes) and ``linear_results.json`` at the end.
    """
    if not 0 < crop_scale <= 1:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
    if output_dir is not None and not storage.is_local(output_dir):
        raise ValueError(f"--output-dir must be a local directory, got {output_dir}")
    model, cfg = load_backbone(checkpoint, which)
    train_ds = _split(train_path, image_size, cfg, True,
                      linear_train_transform(image_size, scale=(crop_scale, 1.0)))
    val_ds = _split(val_path, image_size, cfg, False)
    num_classes = _num_classes(train_ds, val_ds)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(output_dir.removeprefix("file://")) if output_dir else None
    res = train_linear(model, train_ds, val_ds, epochs=epochs, lr=lr, batch_size=batch_size,
                       n_last_blocks=n_last_blocks, avgpool=avgpool, num_classes=num_classes,
                       device=device, checkpoint_path=out / "linear_probe.pt" if out else None,
                       num_workers=num_workers, seed=seed, on_epoch_end=on_epoch_end)
    res.pop("classifier")
    if math.isnan(res["train_loss"]):  # nothing left to train: JSON has no NaN
        res["train_loss"] = None
    res.update(n_train=len(train_ds), n_last_blocks=n_last_blocks, avgpool=avgpool, lr=lr,
               crop_scale=crop_scale,
               batch_size=batch_size, image_size=image_size)
    if out is not None:
        (out / "linear_results.json").write_text(json.dumps(res, indent=1))
    return res


def checkpoint_config(uri: str) -> DinoConfig | None:
    """The run config saved beside a checkpoint (``config.yaml``); None for a backbone file."""
    if uri.endswith(".safetensors"):
        return None
    fs, path = storage.get_fs(storage.join(uri, "config.yaml"))
    blob = storage.with_retries(lambda: fs.cat_file(path), f"read of {uri}/config.yaml")
    return DinoConfig.model_validate(yaml.safe_load(blob))


def checkpoint_step(uri: str) -> int:
    """Global step of a checkpoint directory (from its manifest); 0 for a backbone file."""
    if uri.endswith(".safetensors"):
        return 0
    try:
        fs, path = storage.get_fs(storage.join(uri, ckpt.MANIFEST))
        return int(json.loads(fs.cat_file(path)).get("global_step") or 0)
    except (OSError, ValueError):
        return 0


def log_to_checkpoint_run(cfg: DinoConfig | None, metrics: dict[str, float],
                          artifacts: Sequence[str | Path] = (), step: int = 0,
                          tracking_uri: str | None = None,
                          artifact_path: str = "eval") -> tuple[str, str]:
    """Logs evaluation metrics and pictures to the MLflow run that trained the checkpoint.

    The run is the one tagged ``dino.run_name = cfg.run_name`` in ``cfg.tracking.experiment``
    (``Tracker.start``'s convention); it is created if the training run was never tracked.
    A found run keeps its status, so evaluating a checkpoint of a run still training does not
    mark it finished. Tracking URI: ``tracking_uri``, else the run's ``cfg.tracking.uri``, else
    ``MLFLOW_TRACKING_URI``, else the training default (sqlite beside ``cfg.storage.root``).

    Returns:
        ``(tracking uri, run id)``.

    Raises:
        ValueError: without a config (an exported backbone file does not name its run).
        RuntimeError: if the metrics could not be sent.
    """
    from mlflow.tracking import MlflowClient

    from service.tracking import RUN_NAME_TAG, Tracker, default_tracking_uri

    if cfg is None:
        raise ValueError("--mlflow needs a checkpoint directory: an exported backbone file "
                         "does not say which run it came from")
    uri = tracking_uri or cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_location = None
    if not uri:
        uri, artifact_location = default_tracking_uri(cfg.storage.root)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    found = exp and client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run_name}'",
        max_results=1)
    if found:
        tracker = Tracker(uri, found[0].info.run_id)
    else:
        tracker = Tracker.start(uri, cfg.tracking.experiment, cfg.run_name, artifact_location)
    tracker.log_metrics(metrics, step)
    if not tracker.flush():
        raise RuntimeError(f"could not log evaluation metrics to MLflow at {uri}")
    for path in artifacts:
        tracker.log_artifact(path, artifact_path)
    if not found:
        tracker.end("FINISHED")
    return uri, tracker.run_id
