"""The search space of a sweep: ``grid:a,b`` | ``choice:a,b`` | ``uniform:lo,hi`` |
``loguniform:lo,hi`` per config key, every value checked against the config before Ray
starts."""

from __future__ import annotations

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


def parse_domain(key: str, spec: str):
    """The Ray Tune domain of a checked spec (``parse_spec``)."""
    from ray import tune

    kind, items = parse_spec(key, spec)
    if kind == "grid":
        return tune.grid_search(items)
    if kind == "choice":
        return tune.choice(items)
    return (tune.uniform if kind == "uniform" else tune.loguniform)(*items)


def check_space(base: DinoConfig, space: dict[str, str]) -> None:
    """Every swept key and every grid value must make a valid config, before Ray starts."""
    for key, spec in space.items():
        _, values = parse_spec(key, spec)
        for v in values:
            validate(apply_overrides(base.model_dump(mode="json"), [f"{key}={v}"]))
