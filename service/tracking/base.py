"""The tracking seam: what the training loop and the driver call, whatever tracks the run.

``NullTracker`` does nothing, so callers never check ``if tracker:``; the MLflow
implementation is ``service.tracking.mlflow_tracker.MLflowTracker``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

RUN_NAME_TAG = "dino.run_name"


class Tracker(Protocol):
    """One tracked run. ``uri`` and ``run_id`` are None when nothing is tracked."""

    uri: str | None
    run_id: str | None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tag(self, key: str, value: str) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def flush(self) -> bool: ...

    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking turned off (``tracking.enabled=false``) or not this process's job (ranks > 0)."""

    uri: str | None = None
    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def flush(self) -> bool:
        return True

    def end(self, status: str = "FINISHED") -> None:
        pass


def git_revision() -> str:
    """The short git revision of this checkout, ``unknown`` outside one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
