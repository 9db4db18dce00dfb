"""``train.value_changes``: a run whose schedule settings change at given global steps.

Segment 0 is the run's own config; segment ``k`` is that config with the changes up to the
``k``-th set. Each segment's schedules are built for the whole run and indexed by the global
step (``dino_core.schedules.splice_schedules``), so a change at step ``s`` continues as a
fresh schedule of the new value would be at ``s``: what a population-based sweep's trial
trained with after an exploit.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from dino_core.specs import ScheduleSpec
from service.config.schema import DinoConfig
from service.config.specs import schedule_spec


def set_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config data ``data`` with the dotted ``values`` set."""
    out = copy.deepcopy(data)
    for key, value in values.items():
        *sections, leaf = key.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    return out


def segment_data(cfg: DinoConfig) -> list[tuple[int, dict[str, Any]]]:
    """``[(0, the run's config), (step_k, with changes 1..k set), ...]`` as plain data, each
    without ``train.value_changes`` (a segment changes nothing further)."""
    data = cfg.model_dump(mode="json")
    data["train"]["value_changes"] = []
    out = [(0, data)]
    for change in cfg.train.value_changes:
        out.append((change.step, set_values(out[-1][1], change.values)))
    return out


def schedule_segments(cfg: DinoConfig) -> list[tuple[int, ScheduleSpec]]:
    """The schedule settings in effect from each change on: ``[(0, spec), (step, spec)...]``."""
    if not cfg.train.value_changes:
        return [(0, schedule_spec(cfg))]
    return [(step, schedule_spec(DinoConfig.model_validate(data)))
            for step, data in segment_data(cfg)]


def value_change_problems(cfg: DinoConfig) -> list[str]:
    """One line for each change after which the config would not be valid (``loss.teacher_temp``
    above 1, ...), naming the change, its step and the field."""
    out = []
    for i, (step, data) in enumerate(segment_data(cfg)[1:]):
        try:
            DinoConfig.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            out.append(f"train.value_changes.{i} (step {step}): {where}="
                       f"{first.get('input')!r} is not valid: {msg}")
    return out
