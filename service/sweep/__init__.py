"""Hyperparameter sweeps: Ray Tune over Ray Train runs (``run``), their search space
(``space``), the collapse stopper (``stopper``) and results (``results``)."""

from service.sweep.results import SweepSpec
from service.sweep.run import knn_chance, run_sweep
from service.sweep.space import DEFAULT_SPACE, check_space, parse_domain
from service.sweep.stopper import OBJECTIVE, CollapseStopper

__all__ = [
    "DEFAULT_SPACE",
    "OBJECTIVE",
    "CollapseStopper",
    "SweepSpec",
    "check_space",
    "knn_chance",
    "parse_domain",
    "run_sweep",
]
