"""A population-based sweep's lineage: which values each trial trained with from which step
on, and whose checkpoint it copied at an exploit.

Each trial appends its own rows to ``<sweep>/lineage/<run_name>.json`` (one writer per file:
no two trials share a file); the driver gathers them into ``pbt_lineage.csv``. A row says
"from global step ``step`` on, trial ``trial`` trained with ``values``"; an ``exploit`` row
also says that at that step its weights, optimizer, center and data position were those of
``source``'s checkpoint at the same step. JSON only, schema-checked, as the sweep's record.
"""

from __future__ import annotations

import csv
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from service import storage
from service.errors import ConfigError
from service.sweep.record import NAME, checked, read_json, write_json

FOLDER = "lineage"


class LineageRow(BaseModel):
    """From ``step`` on, ``trial`` trained with ``values`` (``start``: its first values;
    ``exploit``: it continued from ``source``'s checkpoint at ``step`` with perturbed ones)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    trial: str = Field(pattern=NAME)
    step: int = Field(ge=0)
    event: Literal["start", "exploit"]
    source: str = ""  # the trial copied (exploit only)
    values: dict[str, StrictFloat | StrictInt]


class TrialLineage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[LineageRow]


def row_url(sweep_url: str, trial: str) -> str:
    return storage.join(sweep_url, FOLDER, f"{trial}.json")


def trial_rows(sweep_url: str, trial: str) -> list[LineageRow]:
    """``trial``'s own rows (none yet: ``[]``); a file that is not one is refused, naming it."""
    url = row_url(sweep_url, trial)
    data = read_json(url, "lineage")
    return [] if data is None else checked(TrialLineage, data, url).rows


def append_row(sweep_url: str, row: LineageRow) -> None:
    """Adds ``row`` to its trial's own file, rewritten whole (a trial writes its rows one at
    a time, from one process)."""
    rows = [*trial_rows(sweep_url, row.trial), row]
    write_json(row_url(sweep_url, row.trial), TrialLineage(rows=rows).model_dump())


def read_rows(sweep_url: str, trials: list[str]) -> list[LineageRow]:
    """The rows of ``trials`` (the sweep's run names), by trial then step."""
    rows = [r for t in trials for r in trial_rows(sweep_url, t)]
    return sorted(rows, key=lambda r: (r.trial, r.step, r.event == "exploit"))


def schedule_of(rows: list[LineageRow], trial: str, until: int | None = None
                ) -> list[tuple[int, dict[str, float]]]:
    """The values that trained ``trial``'s weights, from step 0: ``[(step, values), ...]``,
    steps increasing. Before an exploit at step ``s`` the weights were ``source``'s, so its
    history up to ``s`` is the source's own (followed back through the source's exploits).

    Raises:
        ConfigError: ``trial`` has no rows, or its lineage does not reach a start.
    """
    mine = [r for r in rows if r.trial == trial and (until is None or r.step < until)]
    if not mine:
        raise ConfigError(f"no lineage rows for trial {trial!r}"
                          + (f" before step {until}" if until is not None else ""))
    exploits = [r for r in mine if r.event == "exploit"]
    if exploits:  # the last one decides: its weights' past is the source's
        last = max(exploits, key=lambda r: r.step)
        before = schedule_of(rows, last.source, last.step) if last.step > 0 else []
        return _merge([*before, (last.step, dict(last.values))])
    return _merge([(r.step, dict(r.values)) for r in mine])


def _merge(points: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict[str, float]]]:
    """Sorted by step; a later entry at the same step replaces an earlier one; an entry
    that repeats the values before it is dropped."""
    out: list[tuple[int, dict[str, float]]] = []
    for step, values in sorted(points, key=lambda p: p[0]):
        if out and out[-1][0] == step:
            out[-1] = (step, values)
        elif not out or out[-1][1] != values:
            out.append((step, values))
    return out


def write_csv(path: str, rows: list[LineageRow]) -> str:
    """``pbt_lineage.csv`` at the local ``path`` (the sweep's publishing uploads it): trial,
    step, event, source, then one column per value key; returns ``path``."""
    keys = sorted({k for r in rows for k in r.values})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "step", "event", "source", *keys])
        for r in rows:
            w.writerow([r.trial, r.step, r.event, r.source, *(r.values.get(k, "") for k in keys)])
    return path
