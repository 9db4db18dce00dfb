"""Tracking behind one seam: the ``Tracker`` protocol, ``NullTracker`` and ``MLflowTracker``;
what only an MLflow run holds (the backbone model, system metrics) is addressed by the
tracker's ``uri`` and ``run_id`` and skipped when they are None."""

from service.tracking.base import RUN_NAME_TAG, NullTracker, Tracker, git_revision
from service.tracking.mlflow_tracker import (
    MLflowTracker,
    default_tracking_uri,
    find_run,
    sqlite_lock,
)
from service.tracking.models import MODEL_PATH, log_backbone_model
from service.tracking.system_metrics import system_metrics

__all__ = [
    "MODEL_PATH",
    "RUN_NAME_TAG",
    "MLflowTracker",
    "NullTracker",
    "Tracker",
    "default_tracking_uri",
    "find_run",
    "git_revision",
    "log_backbone_model",
    "sqlite_lock",
    "system_metrics",
]
