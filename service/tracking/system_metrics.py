"""System metrics of the machine that trains: MLflow's ``SystemMetricsMonitor`` (CPU, memory,
disk, network, and each NVIDIA GPU through nvidia-ml-py), as ``system/*`` metrics of the run.

MLflow's monitor samples every ``interval_s`` seconds and publishes a sample only once the
interval after it has passed, so a run shorter than one interval would get none, and the
last part of every run would be lost; ``system_metrics`` therefore publishes one more sample
when the block ends. Only the process that holds the run's tracker samples (rank 0: its
node alone on a cluster of several).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from service.tracking.base import Tracker

log = logging.getLogger(__name__)


@contextmanager
def system_metrics(tracker: Tracker, enabled: bool = True,
                   interval_s: float = 10.0) -> Iterator[Any]:
    """Samples the machine into ``tracker``'s run while the block runs; yields the monitor,
    or None when nothing is sampled (off, or no run: ``uri`` or ``run_id`` None). A resumed
    run continues its steps. A monitor that cannot start or end is a warning, never an error
    of the run."""
    monitor = start(tracker, interval_s) if enabled else None
    try:
        yield monitor
    finally:
        if monitor is not None:
            finish(monitor)


def start(tracker: Tracker, interval_s: float) -> Any:
    if tracker.uri is None or tracker.run_id is None:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s,
                                       resume_logging=True, tracking_uri=tracker.uri)
        monitor.start()
        return monitor
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        log.warning("MLflow at %s: system metrics not sampled: %s", tracker.uri, err)
        return None


def finish(monitor: Any) -> None:
    """Stops the sampling thread, then publishes a last sample (averaged with one the thread
    took and had not published yet, as MLflow aggregates)."""
    try:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: the last system metrics sample was not logged: %s", err)
