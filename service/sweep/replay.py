"""``dino train --replay SWEEP[/TRIAL]``: one fresh run, from step 0, with the values a
population-based sweep's trial trained with, step by step.

The sweep's ``sweep.json`` gives the base config; the trial's lineage, followed back through
its exploits (``lineage.schedule_of``), gives its values from step 0 and the steps where they
changed. The replay sets the first as config values and the others as
``train.value_changes``, whose schedules continue from each change as the trial's did after
its exploit. Without TRIAL, the trial with the best objective among those that finished and
did not collapse. JSON only, as everything a sweep writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from service import storage
from service.config import DinoConfig, apply_overrides, validate
from service.config.loading import parse_override
from service.config.schema import schedule_keys
from service.config.value_changes import set_values
from service.errors import ConfigError
from service.sweep.lineage import read_rows, schedule_of
from service.sweep.plan import DRIVER_SECTIONS
from service.sweep.record import RECORD, SweepRecord, checked, read_json, read_trial
from service.sweep.results import trial_run_name
from service.sweep.stopper import OBJECTIVE

Schedule = list[tuple[int, dict[str, float]]]


@dataclass(frozen=True)
class Replay:
    """The trial to replay and the values it trained with: ``[(step, values), ...]``."""

    sweep: str
    sweep_url: str
    trial: str
    status: str
    objective: float | None
    schedule: Schedule


def locate(target: str, root: str) -> tuple[str, str, str | None]:
    """``(sweep, sweep_url, trial or None)`` of ``SWEEP``, ``SWEEP/TRIAL`` (under ``root``)
    or a sweep's URL or absolute path, with or without ``/TRIAL``. TRIAL is a trial's run name
    (``<sweep>-t003``) or its index (``t003``, ``t3``)."""
    target = target.rstrip("/")
    if "://" in target or target.startswith("/"):
        head, _, last = target.rpartition("/")
        parent = head.rpartition("/")[2]
        trial: str | None = None
        if head and re.fullmatch(rf"(?:{re.escape(parent)}-)?t\d+", last):
            target, trial = head, last
        sweep_url, sweep = target, target.rpartition("/")[2]
    else:
        sweep, _, trial = target.partition("/")
        sweep_url, trial = storage.join(root, sweep), trial or None
    if trial and re.fullmatch(r"t\d+", trial):
        trial = trial_run_name(sweep, int(trial[1:]))
    return sweep, sweep_url, trial


def load(target: str, root: str) -> tuple[SweepRecord, Replay]:
    """The sweep's record and the trial to replay, with its resolved schedule.

    Raises:
        ConfigError: no such sweep, no lineage (not a population-based sweep), no such
            trial, or (TRIAL not given) no trial that finished without collapsing.
    """
    sweep, url, trial = locate(target, root)
    record_url = storage.join(url, RECORD)
    data = read_json(record_url, "sweep record")
    if data is None:
        raise ConfigError(f"--replay {target}: no sweep {sweep!r} at {url} (no {RECORD}); "
                          f"give SWEEP[/TRIAL] under storage.root={root}, or the sweep's URL")
    record: SweepRecord = checked(SweepRecord, data, record_url)
    names = [trial_run_name(record.name, i) for i in range(len(record.trials))]
    rows = read_rows(url, names)
    if not rows:
        raise ConfigError(f"--replay {target}: sweep {record.name!r} has no lineage ({url}/"
                          "lineage/ is empty): only a population-based sweep (dino tune "
                          "--scheduler pbt|pb2) changes values mid-run; replay another "
                          "sweep's trial with `dino train` and its values")
    results = {n: read_trial(url, n) for n in names}
    if trial is None:
        trial = _best(record.name, results)
    elif trial not in results:
        raise ConfigError(f"--replay {target}: sweep {record.name!r} has no trial {trial!r}; "
                          f"its trials are {names[0]} to {names[-1]}")
    result = results[trial]
    replay = Replay(record.name, url, trial, result.status, result.best_objective,
                    schedule_of(rows, trial))
    return record, replay


def _best(sweep: str, results: dict[str, Any]) -> str:
    """The trial with the highest objective among those that ended ``ok`` (never a collapsed
    one); the first in plan order on a tie."""
    ok = [(r.best_objective, -i, n) for i, (n, r) in enumerate(results.items())
          if r.status == "ok" and r.best_objective is not None]
    if not ok:
        seen = sorted({r.status for r in results.values()})
        raise ConfigError(f"--replay {sweep}: no trial of sweep {sweep!r} finished without "
                          f"collapsing (statuses: {', '.join(seen)}); name one: --replay "
                          f"{sweep}/{next(iter(results))}")
    return max(ok)[2]


def value_changes(schedule: Schedule) -> list[dict[str, Any]]:
    """``train.value_changes`` of a schedule after its first entry: at each step, the values
    that differ from the ones before."""
    out, before = [], dict(schedule[0][1])
    for step, values in schedule[1:]:
        changed = {k: v for k, v in values.items() if before.get(k) != v}
        before.update(values)
        if changed:
            out.append({"step": step, "values": changed})
    return out


def replay_config(command: DinoConfig, record: SweepRecord, replay: Replay,
                  overrides: list[str], run_name: str | None = None) -> DinoConfig:
    """The sweep's base config with the command's ``ray``, ``tracking`` and ``storage``
    sections, the trial's values of step 0 set, the later ones as ``train.value_changes``,
    run name ``<sweep>-replay-t<i>`` (or ``run_name``), then ``overrides`` on top."""
    fixed = set(schedule_keys())
    for change in value_changes(replay.schedule):
        bad = sorted(k for k in change["values"] if k not in fixed)
        if bad:
            raise ConfigError(f"--replay: trial {replay.trial!r} changed {', '.join(bad)} at "
                              f"step {change['step']}: only schedule settings "
                              f"({', '.join(sorted(fixed))}) can change mid-run in a replay")
    command_data = command.model_dump(mode="json")
    data = {**record.base, **{s: command_data[s] for s in DRIVER_SECTIONS}}
    data = set_values(data, replay.schedule[0][1])
    data["train"] = {**data.get("train", {}), "value_changes": value_changes(replay.schedule)}
    short = replay.trial.removeprefix(f"{replay.sweep}-")
    data["run_name"] = run_name or f"{replay.sweep}-replay-{short}"
    if any(parse_override(o)[0] == ["train", "resume"] for o in overrides):
        raise ConfigError("--replay trains a fresh run from step 0: it takes no --resume "
                          "(train.resume); a replay stopped midway resumes by its run name")
    return validate(apply_overrides(data, list(overrides)))


def describe(replay: Replay, run_name: str) -> str:
    """One line: which trial is replayed, as which run, and its values step by step."""
    objective = ("no objective" if replay.objective is None
                 else f"best {OBJECTIVE} {replay.objective:.4g}")
    steps = "; ".join(f"step {step}: " + " ".join(f"{k}={v:g}" for k, v in sorted(values.items()))
                      for step, values in replay.schedule)
    return (f"[dino] replaying trial {replay.trial} of sweep {replay.sweep!r} ({replay.status}, "
            f"{objective}) as run {run_name!r}: {steps}")
