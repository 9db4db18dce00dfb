"""The function Ray Train runs on every worker: the loop under a ``RayContext``.

Light at import: Ray Train's controller (and a sweep's trial process) unpickles
``train_loop_per_worker`` by reference and so imports this module, but runs no step; the
loop and its torchvision, timm and dino_core are imported by the workers alone, in the
function. (Measured 2026-12-03 on 2 cores, a fresh interpreter: ``ray.train.torch``, which the
controller imports anyway, 5.9 s; with this module as it was, 8.8 s; this module now, 0.6 s.)"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from service import storage
from service.config import DinoConfig
from service.logs import route_worker_logs
from service.tracking import MLflowTracker, NullTracker, Tracker
from service.tracking.mlflow_tracker import RunSpec


@dataclass
class RunInfo:
    """What the driver hands every worker besides the config."""

    run_url: str  # storage URL of this run (its checkpoints are under it)
    tracking_uri: str | None
    mlflow_run_id: str | None
    # the server was down when the driver started: how rank 0 creates the run later
    pending_run: dict[str, Any] | None = None


def rank_tracker(rank: int, info: RunInfo) -> Tracker:
    """Rank 0 logs to the driver's MLflow run; the other ranks track nothing."""
    if rank == 0 and info.tracking_uri and (info.mlflow_run_id or info.pending_run):
        pending = RunSpec(**info.pending_run) if info.pending_run else None
        return MLflowTracker(info.tracking_uri, info.mlflow_run_id, pending)
    return NullTracker()


def quiet_ray_worker() -> None:
    """Ray Train's INFO lines on the worker ("Reporting training result N: ...", one per
    report) come from loggers named by their file path, which ``LoggingConfig(log_level)``
    does not reach; our own progress line says the same in one line."""
    for name in list(logging.root.manager.loggerDict):
        if "/ray/train/" in name or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point given to ``TorchTrainer``."""
    from service.train.loop import Loop
    from service.train.ray_context import RayContext

    cfg = DinoConfig.model_validate(config["cfg"])
    info = RunInfo(**config["run"])
    route_worker_logs(cfg.ray.verbose)
    if not cfg.ray.verbose:
        quiet_ray_worker()
    storage.configure(cfg.storage.retry_seconds, cfg.storage.spool_dir)
    ctx = RayContext(info.run_url)
    Loop(cfg, ctx, info.run_url, rank_tracker(ctx.rank, info)).run()
