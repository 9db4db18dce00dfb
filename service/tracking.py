"""MLflow tracking that never stops training.

Metrics are logged in batches through ``MlflowClient``; when the server cannot be reached the
batch is kept in memory (up to a bound) with one warning, and flushed once it answers again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_NAME_TAG = "dino.run_name"
MAX_BUFFERED = 100_000


def default_tracking_uri(storage_root: str) -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded default: a sqlite file and an
    artifacts folder beside the local checkpoints (or the working directory for remote storage)."""
    base = Path(storage_root) if "://" not in storage_root else Path.cwd() / "runs"
    base = base.resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}", (base / "mlartifacts").as_uri()


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """One MLflow run, addressed by id, usable from the driver and from rank 0."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        # fail fast and buffer instead of blocking training for minutes of HTTP retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)
        self._buffer: list[Any] = []
        self._down_since: float | None = None
        self.dropped = 0

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> Tracker:
        """Finds the run of this name (resume) or creates it."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(experiment, artifact_location=artifact_location)
        )
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
        )
        all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        tracker = cls(uri, run_id)
        for k, v in all_tags.items():
            tracker.set_tag(k, v)
        return tracker

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self.flush()

    def flush(self) -> bool:
        """Sends buffered metrics; returns False (and keeps them) if the server is down."""
        if not self._buffer:
            return True
        try:
            for i in range(0, len(self._buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000])
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            if self._down_since is None:
                self._down_since = time.time()
                log.warning("MLflow at %s unreachable (%s); buffering metrics", self.uri, err)
            if len(self._buffer) > MAX_BUFFERED:
                self.dropped += len(self._buffer) - MAX_BUFFERED
                self._buffer = self._buffer[-MAX_BUFFERED:]
            return False
        if self._down_since is not None:
            log.warning(
                "MLflow back after %.0fs; flushed %d buffered metric values",
                time.time() - self._down_since,
                len(self._buffer),
            )
            self._down_since = None
        self._buffer = []
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        new = [p for p in items if p.key not in existing]
        for i in range(0, len(new), 100):
            self._safe(lambda b=new[i : i + 100]: self.client.log_batch(self.run_id, params=b))

    def set_tag(self, key: str, value: str) -> None:
        self._safe(lambda: self.client.set_tag(self.run_id, key, value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._safe(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self._safe(lambda: self.client.set_terminated(self.run_id, status=status))

    def _safe(self, fn: Any) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow call failed, continuing without it: %s", err)
