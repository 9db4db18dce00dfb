"""Tracking behind one seam: the ``Tracker`` protocol, ``NullTracker`` and ``MLflowTracker``."""

from service.tracking.base import RUN_NAME_TAG, NullTracker, Tracker, git_revision
from service.tracking.mlflow_tracker import (
    MLflowTracker,
    default_tracking_uri,
    find_run,
    sqlite_lock,
)

__all__ = [
    "RUN_NAME_TAG",
    "MLflowTracker",
    "NullTracker",
    "Tracker",
    "default_tracking_uri",
    "find_run",
    "git_revision",
    "sqlite_lock",
]
