"""``evaluate``: the paper's evaluations of a checkpoint, a run folder or an exported backbone
(k-NN, linear probe, video segmentation, retrieval, copy detection), each returning an
``EvalResult``; ``log_evaluation`` puts one into the MLflow run that trained the checkpoint.

Settings beyond the common ones are the evaluation's own keyword arguments (see
``service.evaluate``: ``knn_eval``, ``linear_eval``, ``video_eval``, ``retrieval_eval``,
``copydetect_eval``); an unknown one is a TypeError naming it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.api.config import Overrides, override_items
from service.errors import ConfigError


@dataclass
class EvalResult:
    kind: str
    checkpoint: str
    metrics: dict[str, float]  # the headline figures, named as they are logged to MLflow
    details: dict[str, Any]  # everything the evaluation measured (per k, per video, ...)


def _settings(preset: str | None, config: str | os.PathLike[str] | None,
              overrides: Overrides) -> dict[str, Any]:
    """The run settings a checkpoint without them (a reference .pth) is evaluated with."""
    return {"preset": preset, "config_file": os.fspath(config) if config else None,
            "overrides": override_items(overrides)}


def knn(checkpoint: str, train: str, val: str, *, weights: str = "teacher",
        preset: str | None = None, config: str | os.PathLike[str] | None = None,
        overrides: Overrides = None, **settings: Any) -> EvalResult:
    """Weighted k-NN on labeled ``train``/``val`` folders or URLs ('procedural': the
    procedural set)."""
    from service.evaluate.knn import knn_eval

    res = knn_eval(checkpoint, train, val, which=weights, **_settings(preset, config, overrides),
                   **settings)
    return EvalResult("knn", checkpoint, {"eval_knn_top1": res["top1"],
                                          "eval_knn_top5": res["top5"]}, res)


def linear(checkpoint: str, train: str, val: str, *, weights: str = "teacher",
           preset: str | None = None, config: str | os.PathLike[str] | None = None,
           overrides: Overrides = None, **settings: Any) -> EvalResult:
    """A linear probe on the frozen backbone (top-1/top-5)."""
    from service.evaluate.linear import linear_eval

    res = linear_eval(checkpoint, train, val, which=weights,
                      **_settings(preset, config, overrides), **settings)
    return EvalResult("linear", checkpoint, {"eval_linear_top1": res["top1"],
                                             "eval_linear_top5": res["top5"]}, res)


def video(checkpoint: str, data: str = "procedural", *, weights: str = "teacher",
          **settings: Any) -> EvalResult:
    """DAVIS 2017 label propagation (J&F) of the patch features."""
    from service.evaluate.video import video_eval

    res = video_eval(checkpoint, data, weights, **settings)
    return EvalResult("video", checkpoint, {"eval_video_jf": res["jf"], "eval_video_j": res["j"],
                                            "eval_video_f": res["f"]}, res)


def retrieval(checkpoint: str, data: str = "procedural", *, weights: str = "teacher",
              **settings: Any) -> EvalResult:
    """Image retrieval mAP (revisited Oxford/Paris protocol)."""
    from service.evaluate.retrieval import retrieval_eval

    res = retrieval_eval(checkpoint, data, which=weights, **settings)
    metrics = {"eval_retrieval_" + k: float(v) for k, v in res.items() if k.startswith("map")}
    return EvalResult("retrieval", checkpoint, metrics, res)


def copydetect(checkpoint: str, data: str = "procedural", *, weights: str = "teacher",
               **settings: Any) -> EvalResult:
    """Copy detection mAP (Copydays "strong" protocol)."""
    from service.evaluate.copydetect import copydetect_eval

    res = copydetect_eval(checkpoint, data, which=weights, **settings)
    return EvalResult("copydetect", checkpoint, {"eval_copydetect_map": res["map"]}, res)


EVALUATIONS: dict[str, Callable[..., EvalResult]] = {
    "knn": knn, "linear": linear, "video": video, "retrieval": retrieval,
    "copydetect": copydetect}


def evaluate(kind: str, checkpoint: str, *args: Any, **settings: Any) -> EvalResult:
    """``evaluate("knn", ckpt, "train_dir", "val_dir")``: the evaluation named ``kind``."""
    if kind not in EVALUATIONS:
        raise ConfigError(f"evaluation {kind!r}: one of {', '.join(EVALUATIONS)}")
    return EVALUATIONS[kind](checkpoint, *args, **settings)


def log_evaluation(result: EvalResult, tracking_uri: str | None = None,
                   artifacts: Sequence[str | Path] = ()) -> tuple[str, str]:
    """Logs ``result``'s metrics (and files) to the MLflow run that trained its checkpoint,
    at the checkpoint's step; returns (tracking URI, run id)."""
    from service.evaluate import checkpoint_config, checkpoint_step, log_to_checkpoint_run

    return log_to_checkpoint_run(checkpoint_config(result.checkpoint), result.metrics,
                                 list(artifacts), checkpoint_step(result.checkpoint),
                                 tracking_uri)


def export(checkpoint: str, out: str, *, which: str = "teacher",
           format: str = "safetensors") -> str:  # noqa: A002 - the CLI's word
    """The teacher (or student) backbone as timm-compatible safetensors, or (``format=
    "reference"``) the reference DINO code's ``checkpoint.pth``; returns the path written."""
    if format == "reference":
        from service.evaluate.reference_export import export_reference

        return export_reference(checkpoint, out)
    if format != "safetensors":
        raise ConfigError(f"export format {format!r}: safetensors or reference")
    from service.evaluate.backbone import export_backbone

    return export_backbone(checkpoint, out, which=which)
