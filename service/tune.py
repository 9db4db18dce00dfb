"""Hyperparameter sweeps: Ray Tune over Ray Train runs (the Tune-with-Train pattern).

Each trial is a function trainable that fits a ``TorchTrainer`` whose reports reach Tune
through ``TuneReportCallback``. The objective is k-NN top-1 on the labeled split, never the
DINO loss: the loss depends on the teacher temperature itself, so it is not comparable
across trials that change it.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from service import storage
from service.config import ConfigError, DinoConfig, apply_overrides, resolve_paths, validate
from service.tracking import Tracker
from service.trainer import init_ray, start_tracking, storage_kwargs, tracking_for
from service.worker import RunInfo

log = logging.getLogger(__name__)
OBJECTIVE = "knn_top1"
DRIVER_RESOURCE = "trial_driver"
DEFAULT_SPACE = {
    "loss.teacher_temp": "grid:0.04,0.07",
    "optim.momentum_teacher": "grid:0.99,0.996",
}


@dataclass
class SweepSpec:
    name: str
    space: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    num_samples: int = 1  # repeats of the grid (random/log-uniform draw again each time)
    max_concurrent: int = 2
    asha_grace: int = 2  # epochs before ASHA may stop a trial
    collapse_patience: int = 2  # reports at chance before a trial counts as collapsed
    collapse_margin: float = 0.05  # entropy within 5% of 0 or log K is collapse


def parse_domain(key: str, spec: str):
    """``grid:a,b`` | ``choice:a,b`` | ``uniform:lo,hi`` | ``loguniform:lo,hi``."""
    import yaml
    from ray import tune

    kind, _, values = spec.partition(":")
    items = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    if kind == "grid" and items:
        return tune.grid_search(items)
    if kind == "choice" and items:
        return tune.choice(items)
    if kind in ("uniform", "loguniform") and len(items) == 2:
        lo, hi = (float(v) for v in items)
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{key}: loguniform needs a positive lower bound, got {lo}")
        return (tune.uniform if kind == "uniform" else tune.loguniform)(lo, hi)
    raise ConfigError(
        f"{key}: search space {spec!r} not understood; use grid:a,b | choice:a,b | "
        "uniform:lo,hi | loguniform:lo,hi"
    )


def check_space(base: DinoConfig, space: dict[str, str]) -> None:
    """Every swept key and every grid value must make a valid config, before Ray starts."""
    for key, spec in space.items():
        kind, _, values = spec.partition(":")
        probes = values.split(",") if kind in ("grid", "choice") else values.split(",")[:2]
        for v in probes:
            data = apply_overrides(base.model_dump(mode="json"), [f"{key}={v}"])
            validate(data)
        parse_domain(key, spec)


class CollapseStopper:
    """Stops a trial whose teacher entropy is within ``margin`` of 0 or log K (the two
    collapse modes), or whose k-NN top-1 stays at chance for ``patience`` reports."""

    def __init__(self, log_k: float, chance: float, margin: float, patience: int) -> None:
        self.log_k, self.chance = log_k, chance
        self.margin, self.patience = margin, patience
        self.at_chance: dict[str, int] = {}
        self.reasons: dict[str, str] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        h = result.get("teacher_entropy")
        if h is not None and (h < self.margin * self.log_k or h > (1 - self.margin) * self.log_k):
            self.reasons[trial_id] = f"teacher entropy {h:.3f} (log K = {self.log_k:.3f})"
            return True
        knn = result.get(OBJECTIVE)
        if knn is not None:
            if knn <= self.chance * 1.1:
                self.at_chance[trial_id] = self.at_chance.get(trial_id, 0) + 1
            else:
                self.at_chance[trial_id] = 0
            if self.at_chance[trial_id] >= self.patience:
                self.reasons[trial_id] = f"k-NN top-1 {knn:.1f}% at chance ({self.chance:.1f}%)"
                return True
        return False


def trial_run_name(sweep: str, trial_id: str) -> str:
    """The Train run (checkpoints, MLflow child run) of one trial."""
    return f"{sweep}-{trial_id}"


def _trial(config: dict[str, Any]) -> None:
    """One trial: a Ray Train run of the base config with this trial's values."""
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from service.trainer import build_trainer

    base = config["__base__"]
    overrides = [f"{k}={v}" for k, v in config.items() if not k.startswith("__")]
    data = apply_overrides(dict(base), overrides)
    data["run_name"] = trial_run_name(config["__sweep__"], tune.get_context().get_trial_id())
    cfg = validate(data)
    tracker = None
    if config["__tracking__"]:
        tracker = start_tracking(cfg, parent_run_id=config["__parent_run__"],
                                 extra_tags={"sweep": config["__sweep__"]})
    info = RunInfo(run_url=storage.join(cfg.storage.root, cfg.run_name),
                   tracking_uri=tracker.uri if tracker else None,
                   mlflow_run_id=tracker.run_id if tracker else None)
    try:
        build_trainer(cfg, info, callbacks=[TuneReportCallback()]).fit()
    except ray.train.TrainingFailedError:
        if tracker:
            tracker.end("FAILED")
        raise
    if tracker:
        tracker.end("FINISHED")


def run_sweep(base: DinoConfig, spec: SweepSpec, resume: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the sweep; returns the rows of the results table, best first."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = resolve_paths(base)
    if not base.eval.knn_every_epochs:
        base = validate(apply_overrides(base.model_dump(mode="json"), ["eval.knn_every_epochs=1"]))
    check_space(base, spec.space)
    storage.makedirs(base.storage.root)
    sweep_url = storage.join(base.storage.root, spec.name)
    parent = start_tracking(validate({**base.model_dump(mode="json"), "run_name": spec.name}),
                            extra_tags={"sweep": spec.name, "kind": "sweep"})
    init_ray(base, extra_resources={DRIVER_RESOURCE: spec.max_concurrent})

    param_space: dict[str, Any] = {k: parse_domain(k, v) for k, v in spec.space.items()}
    param_space.update({
        "__base__": base.model_dump(mode="json"), "__sweep__": spec.name,
        "__tracking__": tracking_for(base)[0] is not None,
        "__parent_run__": parent.run_id if parent else None,
    })
    chance = 100.0 / base.data.procedural_classes
    stopper = CollapseStopper(math.log(base.model.out_dim), chance, spec.collapse_margin,
                              spec.collapse_patience)
    trainable = tune.with_resources(_trial, _driver_resources())
    run_config = tune.RunConfig(name=spec.name, stop=stopper, **storage_kwargs(base.storage.root))
    path = storage.join(base.storage.root, spec.name)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"no sweep to resume at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, param_space=param_space,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space, run_config=run_config,
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE, mode="max", num_samples=spec.num_samples,
                max_concurrent_trials=spec.max_concurrent,
                scheduler=ASHAScheduler(time_attr="epoch", grace_period=spec.asha_grace,
                                        max_t=10_000),
            ),
        )
    # k-NN runs every eval.knn_every_epochs, not at every report: reports without it are
    # fine (ASHA and the collapse stopper skip them), so Tune must not insist on it
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    grid = tuner.fit()
    rows = _rows(grid, spec, stopper, base)
    _publish(rows, spec, sweep_url, parent, base)
    return {"rows": rows, "sweep_url": sweep_url,
            "parent_run_id": parent.run_id if parent else None}


def _driver_resources() -> dict[str, float]:
    """A trial's driver only waits on its TorchTrainer: it takes a slot of the custom
    ``trial_driver`` resource (a zero-CPU bundle is refused), or a sliver of a CPU on a
    cluster that does not declare that resource."""
    import ray

    if ray.cluster_resources().get(DRIVER_RESOURCE):
        return {"cpu": 0, DRIVER_RESOURCE: 1}
    log.warning("cluster has no %r resource; each trial driver takes 0.1 CPU", DRIVER_RESOURCE)
    return {"cpu": 0.1}


def _rows(grid, spec: SweepSpec, stopper: CollapseStopper, base: DinoConfig) -> list[dict]:
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        best = float(df[OBJECTIVE].max()) if df is not None and OBJECTIVE in df else float("nan")
        trial_id = (r.metrics or {}).get("trial_id", "")
        status = "error" if r.error else "ok"
        if trial_id in stopper.reasons:
            status = f"collapsed: {stopper.reasons[trial_id]}"
        row = {k: r.config.get(k) for k in spec.space}
        row.update({
            OBJECTIVE: best,
            "last_" + OBJECTIVE: (r.metrics or {}).get(OBJECTIVE, float("nan")),
            "teacher_entropy": (r.metrics or {}).get("teacher_entropy", float("nan")),
            "epochs": (r.metrics or {}).get("epoch"),
            "status": status,
            "run_name": trial_run_name(spec.name, trial_id),
            "trial_dir": r.path,
        })
        rows.append(row)
    rows.sort(key=lambda x: (-(x[OBJECTIVE] if x[OBJECTIVE] == x[OBJECTIVE] else -1e9)))
    return rows


def _publish(rows: list[dict], spec: SweepSpec, sweep_url: str, parent: Tracker | None,
             base: DinoConfig) -> None:
    from service.heatmap import objective_heatmap

    with tempfile.TemporaryDirectory() as d:
        table = os.path.join(d, "results.csv")
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
            w.writeheader()
            w.writerows(rows)
        files = [table]
        keys = list(spec.space)
        if len(keys) >= 2:
            png = os.path.join(d, "objective_heatmap.png")
            objective_heatmap(rows, keys[0], keys[1], OBJECTIVE, png)
            files.append(png)
        ok = [r for r in rows if r["status"] == "ok" and r[OBJECTIVE] == r[OBJECTIVE]]
        if ok:
            src = storage.join(base.storage.root, ok[0]["run_name"], "teacher_backbone.safetensors")
            if storage.exists(src):
                best = os.path.join(d, "best_teacher_backbone.safetensors")
                storage.download_file(src, best)
                files.append(best)
        fs, path = storage.get_fs(sweep_url)
        for f_ in files:
            target = path.rstrip("/") + "/" + os.path.basename(f_)
            storage.with_retries(lambda f_=f_, t=target: fs.put(f_, t), f"upload of {f_}")
            if parent:
                parent.log_artifact(f_)
        if parent:
            if ok:
                parent.log_metrics({f"best_{OBJECTIVE}": ok[0][OBJECTIVE]}, 0)
                for k in keys:
                    parent.set_tag(f"best.{k}", str(ok[0][k]))
            parent.end("FINISHED")
