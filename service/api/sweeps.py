"""``tune``: a hyperparameter sweep with Ray Tune (objective: k-NN top-1)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from service.api.config import Config, Overrides, override_items, resolve
from service.errors import ConfigError

SCHEDULERS = ("asha", "pbt", "pb2")


@dataclass
class SweepResult:
    name: str
    sweep_url: str
    rows: list[dict[str, Any]]  # one a trial, best first: its values, objective, status
    keys: list[str]  # the swept settings
    parent_run_id: str | None  # the sweep's MLflow run

    @property
    def best(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None


def sweep_space(params: Mapping[str, str] | None, add_default_space: bool = False) -> dict[str, str]:
    """The keys and spaces swept: ``params`` (``{"optim.lr": "loguniform:1e-4,1e-2"}``), the
    default space when none is given (or with ``add_default_space``)."""
    from service.sweep import DEFAULT_SPACE

    space = dict(DEFAULT_SPACE) if not params or add_default_space else {}
    for key, spec in (params or {}).items():
        if not spec:
            raise ConfigError(f"--param {key}=: use KEY=grid:a,b | choice:a,b | "
                              "uniform:lo,hi | loguniform:lo,hi")
        space[key] = spec
    return space


def tune(preset: str | None = None, config: Config = None, overrides: Overrides = None, *,
         params: Mapping[str, str] | None = None, add_default_space: bool = False,
         name: str | None = None, num_samples: int = 1, max_concurrent: int = 2,
         scheduler: str = "asha", perturbation_interval: int = 1, resume: bool = False,
         verbose: bool = False, say: Callable[[str], None] = print) -> SweepResult:
    """Sweeps ``params`` over runs of ``preset``/``config``; ``resume`` continues the sweep
    ``name`` from its own record. Bad spaces and settings raise ConfigError before Ray."""
    from service.sweep import OBJECTIVE, SweepSpec, run_sweep

    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler {scheduler!r}: one of {', '.join(SCHEDULERS)}")
    if perturbation_interval < 1:
        raise ConfigError(f"--perturbation-interval {perturbation_interval}: give a number "
                          "of epochs >= 1")
    cfg = resolve(preset, config,
                  [*override_items(overrides), *(["ray.verbose=true"] if verbose else [])])
    space = sweep_space(params, add_default_space)
    spec = SweepSpec(name=name or f"{cfg.run_name}-sweep", space=space,
                     num_samples=num_samples, max_concurrent=max_concurrent,
                     scheduler=scheduler, perturbation_interval=perturbation_interval)
    say(f"[dino] sweep {spec.name!r} over {', '.join(space)}; objective {OBJECTIVE} "
        "(the DINO loss is not comparable across teacher temperatures)")
    out = run_sweep(cfg, spec, resume=resume)
    return SweepResult(spec.name, out["sweep_url"], out["rows"], list(space),
                       out.get("parent_run_id"))
