"""The search space of a sweep: ``grid:a,b`` | ``choice:a,b`` | ``uniform:lo,hi`` |
``loguniform:lo,hi`` per config key, every value checked against the config before Ray
starts, and expanded once into the sweep's trials (no Ray Tune domains: the trials are
drawn here, so that the sweep's own record holds them)."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from service.config import ConfigError, DinoConfig, apply_overrides, validate

DEFAULT_SPACE = {
    "loss.teacher_temp": "grid:0.04,0.07",
    "optim.momentum_teacher": "grid:0.99,0.996",
}


def parse_spec(key: str, spec: str) -> tuple[str, list]:
    """``(kind, values)`` of ``grid:a,b`` | ``choice:a,b`` | ``uniform:lo,hi`` |
    ``loguniform:lo,hi``, checked (no Ray needed)."""
    import yaml

    kind, _, values = spec.partition(":")
    items = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    if kind in ("grid", "choice") and items:
        return kind, items
    if kind in ("uniform", "loguniform") and len(items) == 2:
        lo, hi = (float(v) for v in items)
        if lo >= hi:
            raise ConfigError(f"{key}: {kind} needs low < high, got {spec!r} (write "
                              f"{kind}:{min(lo, hi):g},{max(lo, hi):g})")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{key}: loguniform needs a positive lower bound, got {lo}")
        return kind, [lo, hi]
    raise ConfigError(
        f"{key}: search space {spec!r} not understood; use grid:a,b | choice:a,b | "
        "uniform:lo,hi | loguniform:lo,hi"
    )


def draw(kind: str, items: list, rng: random.Random) -> Any:
    """One value of a ``choice`` / ``uniform`` / ``loguniform`` spec (``parse_spec``)."""
    if kind == "choice":
        return rng.choice(items)
    lo, hi = items
    if kind == "uniform":
        return rng.uniform(lo, hi)
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def expand(space: dict[str, str], num_samples: int, rng: random.Random) -> list[dict[str, Any]]:
    """Every trial's values, as Ray Tune would lay them out: the grid's product, repeated
    ``num_samples`` times, each trial drawing its random keys anew. Drawn once, at the start,
    and written to the sweep's record, so that ``--resume`` runs the same trials."""
    parsed = {k: parse_spec(k, v) for k, v in space.items()}
    grid = [k for k, (kind, _) in parsed.items() if kind == "grid"]
    trials = []
    for _ in range(num_samples):
        for combo in itertools.product(*(parsed[k][1] for k in grid)):
            fixed = dict(zip(grid, combo))
            trials.append({k: fixed[k] if k in fixed else draw(*parsed[k], rng) for k in space})
    return trials


def check_space(base: DinoConfig, space: dict[str, str]) -> None:
    """Every swept key and every grid value must make a valid config, before Ray starts."""
    for key, spec in space.items():
        _, values = parse_spec(key, spec)
        for v in values:
            validate(apply_overrides(base.model_dump(mode="json"), [f"{key}={v}"]))
