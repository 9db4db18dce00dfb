"""Hyperparameter sweeps: Ray Tune over Ray Train runs (``run``), their search space
(``space``), the plan drawn from it and the sweep's own JSON record (``plan``, ``record``:
what ``--resume`` starts from), the collapse stopper (``stopper``) and results
(``results``)."""

from service.sweep.results import SweepSpec
from service.sweep.run import knn_chance, run_sweep
from service.sweep.space import DEFAULT_SPACE, check_space, expand
from service.sweep.stopper import OBJECTIVE, CollapseStopper

__all__ = [
    "DEFAULT_SPACE",
    "OBJECTIVE",
    "CollapseStopper",
    "SweepSpec",
    "check_space",
    "expand",
    "knn_chance",
    "run_sweep",
]
