"""MLflow tracking that never stops training.

Metrics are logged in batches through ``MlflowClient``; when the server cannot be reached they
are kept in memory (up to ``MAX_BUFFERED`` values), tried again every ``RETRY_EVERY`` s and sent
once it answers, with a warning when it goes and when it is back. What is still buffered when
the process ends is lost, with a warning naming the steps.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.tracking.base import RUN_NAME_TAG

log = logging.getLogger(__name__)

MAX_BUFFERED = 100_000
RETRY_EVERY = 5.0  # s between tries to reach a server that is down


def default_tracking_uri(storage_root: str) -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded default: a sqlite file and an
    artifacts folder beside the local checkpoints (or the working directory for remote storage)."""
    base = Path(storage_root) if "://" not in storage_root else Path.cwd() / "runs"
    base = base.resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}", (base / "mlartifacts").as_uri()


@contextmanager
def sqlite_lock(uri: str) -> Iterator[None]:
    """For a ``sqlite:///`` store, an exclusive ``flock`` on ``<db path>.lock`` for the block.

    MLflow creates a fresh sqlite store's tables (alembic migrations) on the first call of a
    client; two first runs doing that at once crashed one of them ("duplicate column name",
    "table _alembic_tmp_... already exists"), and two creating the same experiment would
    clash too. Other stores (a server, a database server) serialise this themselves.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if str(db) in ("", ":memory:"):
        yield
        return
    lock = db.with_name(db.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
        yield


def fail_fast() -> None:
    """MLflow's HTTP client retries for minutes by default; fail fast and buffer instead.
    Set before the first client call (``MlflowClient`` reads these per request)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@dataclass
class RunSpec:
    """What creates (or finds) a run: kept while the server cannot be reached, so the run is
    created when it answers, with every param and tag given meanwhile."""

    experiment: str
    run_name: str
    artifact_location: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


class MLflowTracker:
    """One MLflow run, addressed by id, usable from the driver and from rank 0. Without a
    ``run_id`` (the server was down when the run started), ``pending`` says how to create it
    at the first flush that reaches the server."""

    def __init__(self, uri: str, run_id: str | None, pending: RunSpec | None = None) -> None:
        from mlflow.tracking import MlflowClient

        fail_fast()
        self.uri = uri
        self.run_id = run_id
        self.pending_run = pending
        self.client = MlflowClient(tracking_uri=uri)
        self._buffer: list[Any] = []
        self._down_since: float | None = None  # time.monotonic() of the first failure
        self._next_try = 0.0
        self._sent_while_down = 0
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
    ) -> MLflowTracker:
        """Finds the run of this name (resume) or creates it. If the server cannot be reached,
        training goes on: the tracker buffers and creates the run once the server answers."""
        all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        spec = RunSpec(experiment, run_name, artifact_location, all_tags)
        fail_fast()
        try:
            run_id = open_run(uri, spec)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow at %s unreachable at the start of the run (%s); training goes "
                        "on, metrics are buffered and the run is created when it answers",
                        uri, str(err).splitlines()[0][:300])
            tracker = cls(uri, None, spec)
            tracker._down_since = time.monotonic()
            tracker._next_try = time.monotonic() + RETRY_EVERY
            return tracker
        tracker = cls(uri, run_id)
        for k, v in all_tags.items():
            tracker.set_tag(k, v)
        return tracker

    def _open_pending(self) -> None:
        """Creates (or finds) the pending run, then sends its tags and params; raises if the
        server cannot be reached."""
        spec = self.pending_run
        if self.run_id is not None or spec is None:
            return
        self.run_id = open_run(self.uri, spec)
        self.pending_run = None
        for k, v in spec.tags.items():
            self.set_tag(k, v)
        self.log_params(spec.params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        # while the server is down, try again every RETRY_EVERY s, not at every step: a server
        # that hangs instead of refusing would cost MLFLOW_HTTP_REQUEST_TIMEOUT per step
        if self._down_since is None or time.monotonic() >= self._next_try:
            self.flush()

    def flush(self) -> bool:
        """Sends buffered metrics now; returns False (and keeps what was not sent) if the
        server cannot be reached."""
        if not self._buffer:
            return True
        try:
            self._open_pending()
            while self._buffer:
                self.client.log_batch(self.run_id, metrics=self._buffer[:1000])
                self._sent_while_down += len(self._buffer[:1000]) if self._down_since else 0
                del self._buffer[:1000]  # sent: a later failure must not send it twice
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._next_try = time.monotonic() + RETRY_EVERY
            if len(self._buffer) > MAX_BUFFERED:
                self.dropped += len(self._buffer) - MAX_BUFFERED
                self._buffer = self._buffer[-MAX_BUFFERED:]
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("MLflow at %s unreachable (%s); buffering metrics (at most %d "
                            "values)", self.uri, err, MAX_BUFFERED)
            else:
                log.warning("MLflow at %s still unreachable after %.0f s: %s", self.uri,
                            time.monotonic() - self._down_since, self.pending())
            return False
        if self._down_since is not None:
            log.warning(
                "MLflow back after %.0f s; flushed %d buffered metric values%s",
                time.monotonic() - self._down_since, self._sent_while_down,
                f" ({self.dropped} dropped: the buffer was full)" if self.dropped else "",
            )
            self._down_since, self._sent_while_down = None, 0
        return True

    def pending(self) -> str:
        """What is buffered, e.g. ``'1230 metric values of steps 41..123 not sent yet'``."""
        steps = [m.step for m in self._buffer]
        text = (f"{len(steps)} metric values of steps {min(steps)}..{max(steps)} not sent yet"
                if steps else "nothing buffered")
        return text + (f", {self.dropped} dropped (buffer full)" if self.dropped else "")

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if self.run_id is None:
            if self.pending_run is not None:
                self.pending_run.params.update(params)
            return
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        new = [p for p in items if p.key not in existing]
        for i in range(0, len(new), 100):
            self._safe(lambda b=new[i : i + 100]: self.client.log_batch(self.run_id, params=b))

    def set_tag(self, key: str, value: str) -> None:
        if self.run_id is None:
            if self.pending_run is not None:
                self.pending_run.tags[key] = value
            return
        self._safe(lambda: self.client.set_tag(self.run_id, key, value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            self._safe(self._open_pending)
        if self.run_id is None:
            log.warning("MLflow at %s unreachable: artifact %s not logged", self.uri, path)
            return
        self._safe(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            self._safe(self._open_pending)
        if not self.flush():
            log.warning("MLflow at %s unreachable at the end of the run: %s are lost",
                        self.uri, self.pending())
        if self.run_id is None:
            log.warning("MLflow at %s never answered: this run was not tracked", self.uri)
            return
        self._safe(lambda: self.client.set_terminated(self.run_id, status=status))

    def _safe(self, fn: Any) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow call failed, continuing without it: %s", err)


def open_run(uri: str, spec: RunSpec) -> str:
    """The id of the run named ``spec.run_name`` in ``spec.experiment`` (found by its tag:
    a resumed run keeps its run), created with ``spec.tags`` if there is none."""
    from mlflow.tracking import MlflowClient

    experiment, run_name, all_tags = spec.experiment, spec.run_name, spec.tags
    artifact_location = spec.artifact_location
    with sqlite_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)  # creates a fresh store's tables
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(experiment, artifact_location=artifact_location)
        )
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    return run_id


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the run tagged ``dino.run_name = run_name`` in ``experiment``, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    found = exp and client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        max_results=1)
    return found[0].info.run_id if found else None
