"""The driver of a training run: Ray, storage and tracking around ``service.train.worker``.

Everything that can be wrong with the config is checked before Ray is started.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import asdict, dataclass
from typing import Any

from service import data, storage
from service.cluster.env import job_env
from service.config import DinoConfig, flatten, resolve_paths
from service.errors import ConfigError, RunStopped, is_project_error
from service.storage import checkpoints as ckpt
from service.storage.arrow import pyarrow_fs
from service.tracking import MLflowTracker, NullTracker, Tracker, default_tracking_uri, git_revision
from service.train import ray_compat
from service.train.preflight import preflight
from service.train.stopping import clear_stop, request_stop
from service.train.worker import RunInfo, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_name: str
    run_url: str
    checkpoint: str | None
    metrics: dict[str, Any]
    tracking_uri: str | None
    mlflow_run_id: str | None
    backbone: str


def init_ray(cfg: DinoConfig, extra_resources: dict[str, float] | None = None) -> None:
    """A local Ray in this process by default, or the cluster at ``ray.address``.

    ``extra_resources`` are custom resources of the local Ray (a cluster declares its own in
    ``ray start --resources``)."""
    import ray

    if ray.is_initialized():
        return
    if not cfg.ray.verbose:
        quiet_ray_driver()
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        # address="local" never joins a cluster another process left behind; the dashboard
        # process hosts the State API that Ray Train's controller polls
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, resources=extra_resources,
                 include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=None,
                 log_to_driver=True, configure_logging=False)


def quiet_ray_driver() -> None:
    """Turns off Ray's start-up notices in this process (the worker lines forwarded to this
    driver are filtered by ``service.cli.main.output_environment``)."""
    for name in ray_compat.NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def tracking_for(cfg: DinoConfig) -> tuple[str | None, str | None]:
    if not cfg.tracking.enabled:
        return None, None
    if cfg.tracking.uri:
        return cfg.tracking.uri, None
    return default_tracking_uri(cfg.storage.root)


def storage_kwargs(root: str) -> dict[str, Any]:
    """RunConfig storage arguments. Remote URLs go through the same fsspec filesystem as the
    rest of the service (s3fs honours AWS_ENDPOINT_URL and the AWS variables), wrapped for
    pyarrow (pyarrow's own S3 client failed multipart uploads against S3-compatible servers)
    by a handler that rides out storage outages: Ray's checkpoint uploads, its snapshot writes
    and restores are retried for up to ``storage.retry_seconds``, and a checkpoint that
    never got through is kept on local disk (``service.storage.arrow.RetryingFSHandler``)."""
    if storage.is_local(root):
        return {"storage_path": root.removeprefix("file://")}
    fs, path = pyarrow_fs(root)
    return {"storage_path": path, "storage_filesystem": fs}


# Set by Ctrl-C during fit(): Ray Train's own SIGINT handler aborts the run and then leaves
# by sys.exit(0) (or returns a result), which alone would not tell an interrupt apart
INTERRUPTED = threading.Event()


def interruptible(trainer_cls: type) -> type:
    """``trainer_cls`` whose SIGINT handler (Ray Train's graceful abort) also sets
    ``INTERRUPTED``."""
    return ray_compat.chain_sigint_handler(trainer_cls, INTERRUPTED.set)


def build_trainer(cfg: DinoConfig, info: RunInfo, callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    from service.train.backend import DinoTorchConfig
    from service.train.resize import SaveBeforeResize

    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    # the same rule as job submission: storage and MLflow settings, never credentials (the
    # cluster's nodes have their own); runtime envs are readable by anyone with the dashboard
    env = job_env(os.environ)
    datasets = None
    if cfg.data.loader == "ray_data":
        datasets = {"train": data.ray_dataset(cfg.data.path, data.canvas_size(cfg))}
    return interruptible(TorchTrainer)(
        train_loop_per_worker,
        datasets=datasets,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "run": asdict(info)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cfg.ray.elastic_resize_interval_s),
        torch_config=DinoTorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_last),
            # a drained (preempted) node's restarts are counted apart, without limit
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures,
                                                   max_preemption_failures=-1),
            # Ray Train's INFO lines ("Reporting training result N: ...") beside our own
            # progress line are noise unless asked for
            logging_config=ray.train.LoggingConfig(
                log_level="INFO" if cfg.ray.verbose else "WARNING"),
            callbacks=[*(callbacks or []),
                       SaveBeforeResize(cfg.run_name, 2 * cfg.train.preemption_grace_s)],
            worker_runtime_env={"env_vars": env} if cfg.ray.address else None,
            **storage_kwargs(cfg.storage.root),
        ),
    )


def start_tracking(cfg: DinoConfig, parent_run_id: str | None = None,
                   extra_tags: dict[str, str] | None = None) -> Tracker:
    """The run's MLflow run (found by name, or created), or a ``NullTracker`` when tracking
    is off."""
    uri, artifacts = tracking_for(cfg)
    if uri is None:
        return NullTracker()
    tags = {"git_revision": git_revision(), "world_size": workers_label(cfg),
            **(extra_tags or {})}
    tracker = MLflowTracker.start(uri, cfg.tracking.experiment, cfg.run_name, artifacts, tags,
                            parent_run_id)
    tracker.log_params(flatten(cfg))
    return tracker


def storage_failure(root: str, run_url: str, err: BaseException,
                    local_ray: bool = True) -> storage.StorageError:
    """One message for a run stopped by a storage outage: which storage, and where the
    checkpoints that never reached it are (found here for a local Ray; on a cluster they are
    in the same folder on rank 0's node)."""
    kept = ckpt.kept_locally(run_url)
    lines = [f"storage {root} stayed unreachable for longer than {storage.GAVE_UP}="
             f"{storage.retry_seconds():g} s; the run stopped."]
    for d, manifest in kept:
        what = (f"epoch {manifest['epoch']} step {manifest['global_step']}, complete"
                if manifest else "incomplete")
        lines.append(f"  not uploaded, kept on local disk: {d} ({what})")
    if not kept and local_ray:
        lines.append("  no checkpoint was waiting for its upload: the newest one in storage is "
                     "the run's last")
    elif not kept:
        lines.append(f"  checkpoints that did not get through are kept under "
                     f"{storage.spool_dir() / 'kept'} on the node of rank 0")
    cause = next((ln for ln in str(err).splitlines() if storage.GAVE_UP in ln), "")
    return storage.StorageError("\n".join([*lines, f"  cause: {cause.strip()[:1000]}"]))


def workers_label(cfg: DinoConfig) -> str:
    r = cfg.ray
    return f"{r.min_workers}-{r.max_workers}" if r.elastic else str(r.num_workers)


def check_shared_storage(cfg: DinoConfig) -> None:
    """On a cluster of more than one node, ``storage.root`` must be storage every node
    sees: each node would write its checkpoints to its own disk, and a group restarted on
    another node would not find them. Checked once Ray is up, before training starts."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and storage.is_local(cfg.storage.root):
        raise ConfigError(
            f"storage.root={cfg.storage.root} is a local path, but the Ray cluster has "
            f"{len(nodes)} nodes: workers on other nodes cannot see it (each would write its "
            "checkpoints to its own disk, and a group restarted elsewhere would not find "
            "them); use shared storage, e.g. storage.root=s3://bucket/runs")


def project_error(err: BaseException) -> BaseException | None:
    """The error a worker raised, when it is one of this project's (whose messages are
    written for the user: a NaN stop, bad data, a damaged checkpoint) and ``err`` is Ray
    Train's report of it; None for anything else, which keeps Ray's whole report."""
    inner = ray_compat.worker_error(err)
    if inner is None or not is_project_error(inner):
        return None
    return inner


def on_sigterm(run_url: str) -> Any:
    """SIGTERM to the driver (``dino jobs stop``, a pod deleted): ask the workers to
    checkpoint and end the run; ``fit()`` returns once they have."""

    def handler(signum: int, frame: Any) -> None:
        log.warning("[dino] SIGTERM: asking the workers to checkpoint and stop")
        request_stop(run_url, "SIGTERM to the driver")

    return signal.signal(signal.SIGTERM, handler)


def run_info(run_url: str, tracker: Tracker) -> RunInfo:
    pending = getattr(tracker, "pending_run", None)
    return RunInfo(run_url=run_url, tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id,
                   pending_run=asdict(pending) if pending is not None else None)


def train(cfg: DinoConfig) -> TrainResult:
    """Runs (or resumes) ``cfg.run_name`` to the end and returns where everything is."""
    cfg = resolve_paths(cfg)
    storage.configure(cfg.storage.retry_seconds, cfg.storage.spool_dir)
    storage.makedirs(cfg.storage.root)
    run_url = storage.join(cfg.storage.root, cfg.run_name)
    preflight(cfg, run_url)  # before any cluster resource is taken
    tracker = start_tracking(cfg)
    info = run_info(run_url, tracker)
    if clear_stop(run_url):
        log.warning("[dino] %s: removed the stop request of an earlier stop", run_url)
    try:
        init_ray(cfg)
        check_shared_storage(cfg)
    except BaseException:
        tracker.end("FAILED")
        raise
    INTERRUPTED.clear()
    previous = on_sigterm(run_url) if threading.current_thread() is threading.main_thread() else None
    try:
        result = build_trainer(cfg, info).fit()
    except BaseException as err:
        interrupted = INTERRUPTED.is_set() or isinstance(err, KeyboardInterrupt)
        # MLflow's own word for a run stopped by its user (what `mlflow run` sets on Ctrl-C)
        tracker.end("KILLED" if interrupted else "FAILED")
        if interrupted:
            raise KeyboardInterrupt from err
        if storage.GAVE_UP in str(err):  # a StorageError of a worker or Ray's controller
            raise storage_failure(cfg.storage.root, run_url, err, not cfg.ray.address) from err
        own = project_error(err)
        if own is not None:  # the worker's own message, as in process (Ray's report: -v)
            raise own from err
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if INTERRUPTED.is_set():  # aborted, and fit() returned what there was
        tracker.end("KILLED")
        raise KeyboardInterrupt
    if clear_stop(run_url):  # stopped on request, with a checkpoint of the last step
        tracker.end("KILLED")
        raise RunStopped(f"run {cfg.run_name} stopped on request at step "
                         f"{(result.metrics or {}).get('step', '?')}, checkpoint saved; "
                         "`dino train` with the same run name resumes")
    tracker.end("FINISHED")
    return TrainResult(
        run_name=cfg.run_name, run_url=run_url,
        checkpoint=storage.with_scheme(result.checkpoint.path, run_url) if result.checkpoint else None,
        metrics=dict(result.metrics or {}),
        tracking_uri=info.tracking_uri, mlflow_run_id=tracker.run_id,
        backbone=storage.join(run_url, "teacher_backbone.safetensors"),
    )
