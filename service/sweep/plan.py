"""A sweep's plan: every trial's values, drawn once at the start and written to
``<sweep>/sweep.json`` before Ray starts, so that ``--resume`` runs the same trials under the
same run names, and each unfinished one continues from its own run's checkpoints.

Read back, the plan is checked before anything runs: the schema (``record.SweepRecord``),
the base config and every trial's config (``config.validate``), and that it is the sweep the
command names (same space, same number of samples).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from typing import Any

from service.config import DinoConfig, flatten, validate
from service.config.value_changes import set_values
from service.errors import ConfigError
from service.sweep.record import FORMAT, RECORD, SweepRecord, checked, read_json, write_json
from service.sweep.results import SweepSpec
from service.sweep.space import expand, parse_spec

log = logging.getLogger(__name__)
# sections of the command's config that a resumed sweep takes over from the command, not the
# record: where its driver's Ray, MLflow and storage are (the cluster may have changed)
DRIVER_SECTIONS = ("ray", "tracking", "storage")


def trial_config(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``values`` (``{'optim.lr': 0.001}``) set, as data (values keep their
    type: no YAML round trip, which would read ``1e-05`` as a string)."""
    return set_values(base, values)


def new_plan(base: DinoConfig, spec: SweepSpec, sweep_url: str,
             rng: random.Random | None = None) -> SweepRecord:
    """Draws the trials and writes ``sweep.json``; refuses a name whose sweep exists."""
    url = f"{sweep_url}/{RECORD}"
    if read_json(url, "sweep record") is not None:
        raise ConfigError(f"sweep {spec.name!r} exists already ({url}): add --resume to "
                          "continue it, or give another --name")
    spec_data = {k: v for k, v in asdict(spec).items() if k != "name"}
    record = checked(SweepRecord, {
        "format": FORMAT, "name": spec.name, "spec": spec_data,
        "base": base.model_dump(mode="json"),
        "trials": expand(spec.space, spec.num_samples, rng or random.Random()),
    }, url)
    write_json(url, record.model_dump(mode="json"))
    return record


def load_plan(command: DinoConfig, spec: SweepSpec, sweep_url: str) -> SweepRecord:
    """The record of the sweep to resume, checked; its base config takes the command's
    ``ray``, ``tracking`` and ``storage`` sections (warning about any other difference)."""
    url = f"{sweep_url}/{RECORD}"
    data = read_json(url, "sweep record")
    if data is None:
        raise ConfigError(
            f"no sweep to resume at {sweep_url}: no {RECORD} there (a sweep started before "
            "dino wrote its own record cannot be resumed: Ray Tune's files are pickles, "
            "which are never loaded); start it again without --resume")
    record: SweepRecord = checked(SweepRecord, data, url)
    _same_sweep(record, spec, url)
    recorded = _valid(record.base, url, "base")
    merged = {**record.base, **{s: command.model_dump(mode="json")[s] for s in DRIVER_SECTIONS}}
    _warn_changes(recorded, command, url)
    record = record.model_copy(update={"base": _valid(merged, url, "base").model_dump(mode="json")})
    for i, values in enumerate(record.trials):
        _valid(trial_config(record.base, values), url, f"trials.{i}")
    return record


def _same_sweep(record: SweepRecord, spec: SweepSpec, url: str) -> None:
    """The record must be this command's sweep, with trials of exactly its space."""
    if record.name != spec.name:
        raise ConfigError(f"{url}: refused: it records sweep {record.name!r}, not {spec.name!r}")
    given = (spec.space, spec.num_samples)
    if spec.scheduler != record.spec.scheduler:
        raise ConfigError(f"sweep {spec.name!r} ({url}) was started with --scheduler "
                          f"{record.spec.scheduler}; --resume continues it so: give the same "
                          "option or another --name")
    if given != (record.spec.space, record.spec.num_samples):
        params = " ".join(f"--param {k}={v}" for k, v in record.spec.space.items())
        raise ConfigError(
            f"sweep {spec.name!r} ({url}) was started over {params} with --num-samples "
            f"{record.spec.num_samples}; --resume continues that plan: give the same options "
            "or another --name")
    expected = len(expand(record.spec.space, record.spec.num_samples, random.Random(0)))
    keys = set(record.spec.space)
    for i, values in enumerate(record.trials):
        if set(values) != keys:
            raise ConfigError(f"{url}: refused: trials.{i} sets {sorted(values)}, the space "
                              f"is {sorted(keys)}")
        for key, value in values.items():
            kind, items = parse_spec(key, record.spec.space[key])
            inside = (value in items if kind in ("grid", "choice") else
                      isinstance(value, float) and items[0] <= value <= items[1])
            if not inside:
                raise ConfigError(f"{url}: refused: trials.{i}: {key}={value!r} is not in "
                                  f"{record.spec.space[key]}")
    if len(record.trials) != expected:
        raise ConfigError(f"{url}: refused: {len(record.trials)} trials, the space makes "
                          f"{expected}")


def _valid(data: dict[str, Any], url: str, where: str) -> DinoConfig:
    try:
        return validate(data)
    except ConfigError as err:
        raise ConfigError(f"{url}: refused: {where} is not a valid config: {err}") from None


def _warn_changes(recorded: DinoConfig, command: DinoConfig, url: str) -> None:
    """Settings of the command that the resumed trials do not take: they continue with the
    config their checkpoints were made with."""
    old, new = flatten(recorded), flatten(command)
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and k.split(".")[0] not in DRIVER_SECTIONS
                     and k != "run_name")
    if changed:
        log.warning("%s: the sweep continues with the config it was started with; the "
                    "command's %s ignored", url, ", ".join(changed[:10]) +
                    (" ..." if len(changed) > 10 else ""))
