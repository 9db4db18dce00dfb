"""Hyperparameter sweeps: Ray Tune over Ray Train runs (the Tune-with-Train pattern).

Each trial is a function trainable that fits a ``TorchTrainer`` whose reports reach Tune
through ``TuneReportCallback``. The objective is k-NN top-1 on the labeled split, never the
DINO loss: the loss depends on the teacher temperature itself, so it is not comparable
across trials that change it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from service import data, storage
from service.config import ConfigError, DinoConfig, apply_overrides, resolve_paths, validate
from service.sweep.results import SweepSpec, publish, result_rows, trial_run_name
from service.sweep.space import check_space, parse_domain
from service.sweep.stopper import OBJECTIVE, CollapseStopper
from service.train.driver import (
    build_trainer,
    check_shared_storage,
    init_ray,
    run_info,
    start_tracking,
    storage_kwargs,
)
from service.train.preflight import preflight

log = logging.getLogger(__name__)
DRIVER_RESOURCE = "trial_driver"


def _trial(config: dict[str, Any]) -> None:
    """One trial: a Ray Train run of the base config with this trial's values."""
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    base = config["__base__"]
    overrides = [f"{k}={v}" for k, v in config.items() if not k.startswith("__")]
    data = apply_overrides(dict(base), overrides)
    data["run_name"] = trial_run_name(config["__sweep__"], tune.get_context().get_trial_id())
    cfg = validate(data)
    storage.configure(cfg.storage.retry_seconds, cfg.storage.spool_dir)
    tracker = start_tracking(cfg, parent_run_id=config["__parent_run__"],
                             extra_tags={"sweep": config["__sweep__"]})
    info = run_info(storage.join(cfg.storage.root, cfg.run_name), tracker)
    try:
        build_trainer(cfg, info, callbacks=[TuneReportCallback()]).fit()
    except ray.train.TrainingFailedError:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def run_sweep(base: DinoConfig, spec: SweepSpec, resume: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the sweep; returns the rows of the results table, best first."""
    base = resolve_paths(base)
    storage.configure(base.storage.retry_seconds, base.storage.spool_dir)
    if not base.eval.knn_every_epochs:
        base = validate(apply_overrides(base.model_dump(mode="json"), ["eval.knn_every_epochs=1"]))
    check_space(base, spec.space)
    sweep_url = storage.join(base.storage.root, spec.name)
    preflight(base, sweep_url)  # storage and data, before Ray
    from ray import tune  # after every check: a bad sweep never imports Ray
    from ray.tune.schedulers import ASHAScheduler

    storage.makedirs(base.storage.root)
    parent = start_tracking(validate({**base.model_dump(mode="json"), "run_name": spec.name}),
                            extra_tags={"sweep": spec.name, "kind": "sweep"})
    init_ray(base, extra_resources={DRIVER_RESOURCE: spec.max_concurrent})
    check_shared_storage(base)

    param_space: dict[str, Any] = {k: parse_domain(k, v) for k, v in spec.space.items()}
    param_space.update({
        "__base__": base.model_dump(mode="json"), "__sweep__": spec.name,
        "__parent_run__": parent.run_id,
    })
    chance = knn_chance(base)
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
    rows = result_rows(grid, spec, stopper)
    publish(rows, spec, sweep_url, parent, base)
    return {"rows": rows, "sweep_url": sweep_url, "parent_run_id": parent.run_id}


def _driver_resources() -> dict[str, float]:
    """A trial's driver only waits on its TorchTrainer: it takes a slot of the custom
    ``trial_driver`` resource (a zero-CPU bundle is refused), or a sliver of a CPU on a
    cluster that does not declare that resource."""
    import ray

    if ray.cluster_resources().get(DRIVER_RESOURCE):
        return {"cpu": 0, DRIVER_RESOURCE: 1}
    log.warning("cluster has no %r resource; each trial driver takes 0.1 CPU", DRIVER_RESOURCE)
    return {"cpu": 0.1}


def knn_chance(cfg: DinoConfig) -> float:
    """Chance top-1 (%) of the k-NN objective: one over the labeled split's class count (a
    folder split's own, not the procedural set's)."""
    return 100.0 / data.num_classes(*data.eval_datasets(cfg))
