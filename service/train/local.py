"""A whole run in this process, without Ray: the same loop, checkpoints, exports and MLflow
run as ``dino train`` (``service.train.driver``), on one rank (``InProcessContext``).

For a laptop or a notebook, where a local Ray's start-up and its worker processes cost more
than a small run itself (about 30 s before the first step on 2 cores). A run trained here
resumes under Ray and the other way round: the checkpoints are the same.
"""

from __future__ import annotations

from service import storage
from service.config import DinoConfig, resolve_paths
from service.errors import ConfigError, RunStopped
from service.train.context import InProcessContext
from service.train.driver import TrainResult, start_tracking
from service.train.exports import BACKBONE_FILE
from service.train.preflight import preflight
from service.train.stopping import clear_stop


def check_in_process(cfg: DinoConfig) -> None:
    """What only a Ray run can do, refused before anything starts."""
    if cfg.data.loader == "ray_data":
        raise ConfigError("data.loader=ray_data streams from a Ray Dataset and needs Ray; "
                          "in process, use data.loader=torch")
    if cfg.ray.elastic or cfg.ray.num_workers != 1:
        raise ConfigError(f"in process there is one worker: ray.num_workers="
                          f"{cfg.ray.num_workers}{' (elastic)' if cfg.ray.elastic else ''} "
                          "needs Ray (train without in_process / --in-process)")


def train_in_process(cfg: DinoConfig, device: str = "cpu") -> TrainResult:
    """Runs (or resumes) ``cfg.run_name`` in this process; the result ``driver.train`` gives."""
    from service.train.loop import Loop  # torch, timm and dino_core: only when training

    cfg = resolve_paths(cfg)
    check_in_process(cfg)
    storage.configure(cfg.storage.retry_seconds, cfg.storage.spool_dir)
    storage.makedirs(cfg.storage.root)
    run_url = storage.join(cfg.storage.root, cfg.run_name)
    preflight(cfg, run_url)
    tracker = start_tracking(cfg)
    clear_stop(run_url)
    ctx = InProcessContext(run_url, cfg.train.keep_last, device)
    try:
        loop = Loop(cfg, ctx, run_url, tracker)
        loop.run()
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    if loop.stopped:
        clear_stop(run_url)
        tracker.end("KILLED")
        raise RunStopped(f"run {cfg.run_name} stopped on request at step "
                         f"{loop.state.global_step}, checkpoint saved; `dino train` with the "
                         "same run name resumes")
    tracker.end("FINISHED")
    metrics = next((m for m, _ in reversed(ctx.reports) if m), {})
    return TrainResult(
        run_name=cfg.run_name, run_url=run_url, checkpoint=ctx.registered_checkpoint(),
        metrics=dict(metrics), tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id,
        backbone=storage.join(run_url, BACKBONE_FILE))
