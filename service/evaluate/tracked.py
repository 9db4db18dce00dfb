"""Evaluation results into the MLflow run that trained the checkpoint (``--mlflow``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from service.config import DinoConfig
from service.tracking import MLflowTracker, default_tracking_uri, find_run


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
    if cfg is None:
        raise ValueError("--mlflow needs a checkpoint directory: an exported backbone file "
                         "does not say which run it came from")
    uri = tracking_uri or cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_location = None
    if not uri:
        uri, artifact_location = default_tracking_uri(cfg.storage.root)
    found = find_run(uri, cfg.tracking.experiment, cfg.run_name)
    if found:
        tracker = MLflowTracker(uri, found)
    else:
        tracker = MLflowTracker.start(uri, cfg.tracking.experiment, cfg.run_name,
                                      artifact_location)
    tracker.log_metrics(metrics, step)
    if not tracker.flush():
        raise RuntimeError(f"could not log evaluation metrics to MLflow at {uri}")
    for path in artifacts:
        tracker.log_artifact(path, artifact_path)
    if not found:
        tracker.end("FINISHED")
    return uri, tracker.run_id
