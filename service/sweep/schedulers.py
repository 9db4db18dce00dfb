"""The Tune scheduler of a sweep: ASHA (the default: stops the weak trials early), PBT or PB2
(population-based: a losing trial copies a winner's checkpoint and goes on with perturbed
values, so the population finds a schedule, not a constant).

The PBT/PB2 settings and why each default is what it is:

- ``time_attr="pbt_epoch"``, ``perturbation_interval`` in epochs (``--perturbation-interval``,
  default 1): the objective is k-NN top-1, measured at epoch ends (a sweep measures it every
  epoch), so an epoch is the finest interval at which trials can be compared.
  ``pbt_epoch`` is the report's epoch, left out of a trial's last epoch: an exploit there
  would restart a trial only to copy a checkpoint and end.
- ``quantile_fraction=0.25`` (Ray's default): the bottom quarter copies the top quarter; with
  a population of 4, one trial copies one other per interval.
- ``resample_probability=0.25`` (Ray's default): now and then a value is drawn anew from the
  space instead of perturbed, so the population does not only drift around its start.
- ``perturbation_factors=(1.2, 0.8)`` (Ray's default), applied here (``perturb``) so that
  every mutated value lies inside ``[low, high]`` of its key (a grid's lowest and highest
  value, a ``uniform``/``loguniform``'s bounds, where ``check_space`` found valid configs)
  and differs from the copied trial's; momenta are scaled by their distance to 1.
- ``burn_in_period=0``: DINO's first epoch already separates a learning teacher from a
  collapsed one (the collapse check's signals), and a collapsed trial should be replaced at
  the first chance.
- ``synch=False`` (Ray's default): no trial waits for the slowest at each interval.
- No time-sharing when the whole population runs at once (``--max-concurrent`` at least the
  population): Ray's PBT pauses a trial at its interval whenever another one is pending,
  to free room for it; after an exploit the copied trial is pending only until it restarts in
  the room it just left, so that pause would cost a trial a restart (~10-30 s) for nothing.
"""

from __future__ import annotations

import math
import random
from typing import Any

from service.errors import ConfigError
from service.sweep.space import parse_spec

SCHEDULERS = ("asha", "pbt", "pb2")
QUANTILE_FRACTION = 0.25
RESAMPLE_PROBABILITY = 0.25
PERTURBATION_FACTORS = (1.2, 0.8)


def bounds(space: dict[str, str]) -> dict[str, tuple[float, float]]:
    """``{key: (low, high)}`` of every numeric key with more than one value: what PBT/PB2
    mutate. Keys with one value stay fixed."""
    out = {}
    for key, spec in space.items():
        _, items = parse_spec(key, spec)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            continue
        lo, hi = float(min(items)), float(max(items))
        if lo < hi:
            out[key] = (lo, hi)
    return out


def check_population(scheduler: str, space: dict[str, str], trials: int) -> None:
    """A population-based sweep needs something to mutate and someone to copy."""
    if scheduler == "asha":
        return
    if not bounds(space):
        raise ConfigError(f"--scheduler {scheduler}: no swept key has a numeric range to "
                          f"mutate (space: {space}); give e.g. --param "
                          "loss.teacher_temp=uniform:0.03,0.08")
    if trials < 2:
        raise ConfigError(f"--scheduler {scheduler}: a population of {trials} trial cannot "
                          "exploit: give --num-samples 4 (or a grid of several values)")


# settings whose scale is their distance to 1: perturbed as 1 - value (0.996 * 1.2 would
# leave the range; 1 - 0.004 * 1.2 = 0.9952 is the step PBT means)
TOWARDS_ONE = ("optim.momentum_teacher", "loss.center_momentum")
VALUES = "__values__"  # the config key that carries a trial's current values


def perturb(key: str, value: float, lo: float, hi: float, kind: str,
            rng: random.Random) -> float:
    """One PBT mutation of ``value`` inside ``[lo, hi]``: with ``RESAMPLE_PROBABILITY`` a
    fresh draw (log-uniform keys in log space), else a factor of ``PERTURBATION_FACTORS``
    (on ``1 - value`` for ``TOWARDS_ONE`` keys); a factor that would leave the range is
    swapped for the other one, and what still leaves it is clipped; a value that ends where
    it was (a resample equal to it) is moved by the other factor."""
    if rng.random() < RESAMPLE_PROBABILITY:
        new = (math.exp(rng.uniform(math.log(lo), math.log(hi))) if kind == "loguniform"
               else rng.uniform(lo, hi))
        if new != value:
            return new
    factors = list(PERTURBATION_FACTORS)
    rng.shuffle(factors)
    moved = [1 - (1 - value) * f if key in TOWARDS_ONE else value * f for f in factors]
    inside = [v for v in moved if lo <= v <= hi and v != value]
    if inside:
        return inside[0]
    clipped = [min(max(v, lo), hi) for v in moved]
    changed = [v for v in clipped if v != value]
    return changed[0] if changed else clipped[0]


def record_values(space: dict[str, str]):
    """PB2's ``custom_explore_fn``: its GP's new values (inside the bounds) recorded as the
    trial's current ones (``VALUES``), unchanged."""
    keys = list(bounds(space))

    def explore(config: dict[str, Any]) -> dict[str, Any]:
        config[VALUES] = {**config[VALUES], **{k: config[k] for k in keys}}
        return config

    return explore


def explore_within(space: dict[str, str], rng: random.Random):
    """PBT's ``custom_explore_fn``: replaces Ray's perturbation (which knows no bounds, and
    scales a momentum by 1.2) with ``perturb`` of each key's current value (``VALUES``,
    the copied trial's), and records the new values there."""
    space_bounds = bounds(space)

    def explore(config: dict[str, Any]) -> dict[str, Any]:
        current = dict(config[VALUES])
        for key, (lo, hi) in space_bounds.items():
            kind, _ = parse_spec(key, space[key])
            current[key] = perturb(key, float(current[key]), lo, hi, kind, rng)
            config[key] = current[key]
        config[VALUES] = current
        return config

    return explore


def mutations(space: dict[str, str]) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: a resample draws from the key's own distribution
    (log-uniform keys in log space), within its bounds."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, (lo, hi) in bounds(space).items():
        kind, _ = parse_spec(key, space[key])
        out[key] = tune.loguniform(lo, hi) if kind == "loguniform" else tune.uniform(lo, hi)
    return out


def all_at_once(cls: type) -> type:
    """``cls`` (PBT or PB2) that never pauses a trial to let a pending one run (its
    ``on_trial_result``'s PAUSE becomes CONTINUE; an exploit's own pause is made inside and
    stays)."""
    from ray.tune.schedulers import TrialScheduler

    class AllAtOnce(cls):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE if decision == TrialScheduler.PAUSE else decision

    AllAtOnce.__name__ = AllAtOnce.__qualname__ = f"{cls.__name__}AllAtOnce"
    return AllAtOnce


def build(scheduler: str, space: dict[str, str], interval: int, asha_grace: int,
          seed: int | None = None, at_once: bool = False) -> Any:
    """The Tune scheduler (``tune.run`` gives it the objective, to maximise; see the
    module's text for the defaults). ``at_once``: the whole population runs at once."""
    if scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="epoch", grace_period=asha_grace, max_t=10_000)
    # metric and mode come from tune.run (OBJECTIVE, max)
    common = dict(time_attr="pbt_epoch", perturbation_interval=interval,
                  quantile_fraction=QUANTILE_FRACTION, require_attrs=False)
    if scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        cls = all_at_once(PopulationBasedTraining) if at_once else PopulationBasedTraining
        return cls(
            **common, burn_in_period=0, hyperparam_mutations=mutations(space),
            resample_probability=RESAMPLE_PROBABILITY,
            perturbation_factors=PERTURBATION_FACTORS,
            custom_explore_fn=explore_within(space, random.Random(seed)))
    if scheduler == "pb2":
        try:
            from ray.tune.schedulers.pb2 import PB2
        except ImportError as err:
            raise ConfigError(f"--scheduler pb2 needs GPy ({err}); install it with "
                              "`pip install 'dino-service[pbt]'`, or use --scheduler pbt") from None
        # PB2 picks new values by a GP bandit inside the bounds: no perturbation factors
        return (all_at_once(PB2) if at_once else PB2)(**common, hyperparam_bounds={k: list(v) for k, v in bounds(space).items()},
                   custom_explore_fn=record_values(space))
    raise ConfigError(f"--scheduler {scheduler!r}: use one of {', '.join(SCHEDULERS)}")


def inside(value: float, lo: float, hi: float) -> bool:
    """Within the bounds, up to float rounding."""
    return lo - 1e-12 * max(1.0, abs(lo)) <= value <= hi + 1e-12 * max(1.0, abs(hi)) \
        and math.isfinite(value)
