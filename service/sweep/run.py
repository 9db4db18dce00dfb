"""Hyperparameter sweeps: Ray Tune over Ray Train runs (the Tune-with-Train pattern).

Each trial is a function trainable that fits a ``TorchTrainer`` whose reports reach Tune
through ``TuneReportCallback``. The objective is k-NN top-1 on the labeled split, never the
DINO loss: the loss depends on the teacher temperature itself, so it is not comparable
across trials that change it.

The sweep's state is its own JSON (``record``, ``plan``): the plan, written before Ray starts,
and each trial's results, written by this driver as Tune reports them. ``--resume`` rebuilds
the sweep from that alone and gives Tune only the unfinished trials, as a fresh experiment;
each continues from its own run's checkpoints. ``Tuner.restore`` is never called and nothing
Tune wrote is ever read back: its files are pickles, and loading one runs the code of whoever
could write to the storage. Tune's own folder is a new one at every start (``tune/<time>``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import time
from typing import Any

from service import data, storage
from service.config import DinoConfig, apply_overrides, resolve_paths, validate
from service.sweep import schedulers
from service.sweep.lineage import read_rows
from service.sweep.plan import load_plan, new_plan, trial_config
from service.sweep.record import SweepRecord, TrialLog, TrialResult, read_trial
from service.sweep.results import SweepSpec, publish, result_rows, trial_run_name
from service.sweep.space import check_space, expand
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
    """One trial: a Ray Train run of the base config with this trial's values, under the
    run name of its place in the plan (so a resumed sweep continues the same run)."""
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = config["__trial__"]
    cfg = validate({**trial_config(config["__base__"], trial["values"]),
                    "run_name": trial["run_name"]})
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


def _population_trial(config: dict[str, Any]) -> None:
    """One trial of a PBT/PB2 sweep (``service.sweep.pbt``): its values are the config's
    top-level keys, which PBT mutates at an exploit."""
    import ray.train

    from service.sweep.pbt import PopulationTrial, run_population_trial

    trial = PopulationTrial(config, config["__keys__"], CollapseStopper(*config["__collapse__"]),
                            config["__sweep_url__"])
    storage.configure(trial.cfg.storage.retry_seconds, trial.cfg.storage.spool_dir)
    trial.start()
    tracker = start_tracking(trial.cfg, parent_run_id=config["__parent_run__"],
                             extra_tags={"sweep": config["__sweep__"]})
    info = run_info(trial.run_url, tracker)
    try:
        run_population_trial(
            trial, lambda bridge: build_trainer(trial.cfg, info, callbacks=[bridge]).fit(),
            tracker)
    except ray.train.TrainingFailedError:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def current_values(record: SweepRecord, names: list[str], sweep_url: str,
                   population: bool) -> list[dict[str, Any]]:
    """Each trial's values as it last trained: the plan's, or, in a population-based sweep,
    those of its newest lineage row (after its last exploit)."""
    if not population:
        return list(record.trials)
    last = {r.trial: r.values for r in read_rows(sweep_url, names)}
    return [{**values, **last.get(n, {})} for values, n in zip(record.trials, names)]


def run_sweep(base: DinoConfig, spec: SweepSpec, resume: bool = False) -> dict[str, Any]:
    """Runs (or resumes) the sweep; returns the rows of the results table, best first."""
    base = resolve_paths(base)
    storage.configure(base.storage.retry_seconds, base.storage.spool_dir)
    every = base.eval.knn_every_epochs
    if not every or (spec.scheduler != "asha" and spec.perturbation_interval % every):
        # the objective at each of PBT's intervals (k-NN every 4 epochs and an interval of
        # 1 would compare trials only every 4)
        print(f"[dino] eval.knn_every_epochs={every} -> 1: the sweep's objective is measured "
              "every epoch", flush=True)
        base = validate(apply_overrides(base.model_dump(mode="json"), ["eval.knn_every_epochs=1"]))
    check_space(base, spec.space)
    sweep_url = storage.join(base.storage.root, spec.name)
    preflight(base, sweep_url)  # storage and data, before Ray
    storage.makedirs(base.storage.root)
    if resume and not storage.exists(sweep_url):  # nothing to resume: a first start (a
        # retried job's command line says --resume from its first attempt on)
        print(f"[dino] no sweep {spec.name!r} at {sweep_url} yet: starting it", flush=True)
        resume = False
    schedulers.check_population(spec.scheduler, spec.space,
                                len(expand(spec.space, spec.num_samples, random.Random(0))))
    record = load_plan(base, spec, sweep_url) if resume else new_plan(base, spec, sweep_url)
    spec = SweepSpec(spec.name, **{**record.spec.model_dump(),
                                   "max_concurrent": spec.max_concurrent})
    names = [trial_run_name(spec.name, i) for i in range(len(record.trials))]
    trials = TrialLog(sweep_url, {n: read_trial(sweep_url, n) if resume else TrialResult()
                                  for n in names})
    todo = [i for i, n in enumerate(names) if not trials.results[n].finished]
    if resume:
        print(f"[dino] resuming sweep {spec.name!r} from {sweep_url}/sweep.json: "
              f"{len(names) - len(todo)} of {len(names)} trials finished, {len(todo)} to run "
              "(Ray Tune's own files there are never read)", flush=True)
    parent = start_tracking(validate({**base.model_dump(mode="json"), "run_name": spec.name}),
                            extra_tags={"sweep": spec.name, "kind": "sweep"})
    if todo:
        _tune(base, spec, record, todo, trials, parent.run_id, sweep_url)
    population = spec.scheduler != "asha"
    rows = result_rows(spec.name, current_values(record, names, sweep_url, population),
                       trials.results, base.storage.root)
    publish(rows, spec, sweep_url, parent, base,
            read_rows(sweep_url, names) if population else None)
    return {"rows": rows, "sweep_url": sweep_url, "parent_run_id": parent.run_id}


def _tune(base: DinoConfig, spec: SweepSpec, record: SweepRecord, todo: list[int],
          trials: TrialLog, parent_run_id: str | None, sweep_url: str) -> None:
    """Runs the trials ``todo`` of the plan as a fresh Tune experiment (``tune.run``, not
    ``Tuner.fit``: its ``ResultGrid`` would load an errored trial's ``error.pkl`` back from
    storage). Their results reach ``trials`` through a driver-side callback."""
    from ray import tune

    init_ray(base, extra_resources={DRIVER_RESOURCE: spec.max_concurrent})
    check_shared_storage(base)
    collapse = (math.log(base.model.out_dim), knn_chance(base), spec.collapse_margin,
                spec.collapse_patience)
    stopper = CollapseStopper(*collapse)
    names = [trial_run_name(spec.name, i) for i in range(len(record.trials))]
    population = spec.scheduler != "asha"
    values = current_values(record, names, sweep_url, population)
    planned = [{"run_name": names[i], "values": values[i]} for i in todo]
    config: dict[str, Any] = {"__trial__": tune.grid_search(planned), "__base__": record.base,
                              "__sweep__": spec.name, "__parent_run__": parent_run_id}
    if population:  # the values as top-level keys: what PBT/PB2 copy and mutate
        keys = list(spec.space)
        config.update({"__keys__": keys, "__collapse__": collapse, "__sweep_url__": sweep_url,
                       schedulers.VALUES: tune.sample_from(
                           lambda s: dict(s.config["__trial__"]["values"]))},
                      **{k: tune.sample_from(lambda s, k=k: s.config["__trial__"]["values"][k])
                         for k in keys})
    # k-NN runs every eval.knn_every_epochs, not at every report: reports without it are
    # fine (ASHA and the collapse stopper skip them), so Tune must not insist on it
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    tune.run(
        tune.with_resources(_population_trial if population else _trial, _driver_resources()),
        name=time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime()) + f"-{secrets.token_hex(2)}",
        config=config, metric=OBJECTIVE, mode="max",
        # a population replaces a collapsed trial by a winner's copy (it reports the lowest
        # objective) rather than stopping it
        stop=None if population else stopper, max_concurrent_trials=spec.max_concurrent,
        scheduler=schedulers.build(spec.scheduler, spec.space, spec.perturbation_interval,
                                   spec.asha_grace, base.train.seed,
                                   at_once=len(todo) <= spec.max_concurrent),
        callbacks=[_recorder(trials, stopper)], raise_on_failed_trial=False,
        trial_name_creator=_run_name, trial_dirname_creator=_run_name,
        **storage_kwargs(storage.join(sweep_url, "tune")),
    )


def _run_name(trial: Any) -> str:
    return trial.config["__trial__"]["run_name"]


def _recorder(log_: TrialLog, stopper: CollapseStopper) -> Any:
    """A Tune callback (on this driver) that hands each trial's start, reports and end to
    ``log_``, which writes them to the sweep's record."""
    from ray import tune

    names: dict[str, str] = {}

    def name(trial: Any) -> str:
        # fixed at the trial's first sight: PBT replaces a trial's config by the one it
        # copies at an exploit, "__trial__" included
        return names.setdefault(trial.trial_id, _run_name(trial))

    class Recorder(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log_.started(name(trial))

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            if "collapsed" in result:  # a population's collapsed trial: not its objective
                result = {k: v for k, v in result.items() if k != OBJECTIVE}
            log_.reported(name(trial), result, OBJECTIVE)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                              **info: Any) -> None:
            reason = stopper.reasons.get(trial.trial_id) or (trial.last_result or {}).get(
                "collapsed")
            log_.ended(name(trial), "collapsed" if reason else "ok", reason or "")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log_.ended(name(trial), "error", _last_error_line(trial.error_file))

    return Recorder()


def _last_error_line(path: str | None) -> str:
    """The last line of the trial's error text, from Tune's staging folder on this machine
    (a text file; its pickled twin is never read)."""
    try:
        with open(path or "", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


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
