"""The Python API: what the ``dino`` command line does, as functions with typed results.

    from service import api

    run = api.train("quickstart", overrides={"train.epochs": 2})
    vectors = api.embed(run.backbone, "photos/", "embeddings/")
    knn = api.knn(run.checkpoint, "procedural", "procedural")

Each function validates its input as the command does (a bad setting raises ConfigError
before anything starts) and raises the same errors (``service.errors``), never SystemExit.
The command line (``service.cli``) is a layer of argument parsing and printing over these.
"""

import importlib
from typing import Any

# name -> module: loaded on first use, so that `dino train` with a bad config fails before
# torch, timm or Ray are imported (seconds on a small machine)
_WHERE = {
    "override_items": "service.api.config", "resolve": "service.api.config",
    "pack": "service.api.data", "EmbedInterrupted": "service.api.embedding",
    "embed": "service.api.embedding", "EvalResult": "service.api.evaluations",
    "copydetect": "service.api.evaluations", "evaluate": "service.api.evaluations",
    "export": "service.api.evaluations", "knn": "service.api.evaluations",
    "linear": "service.api.evaluations", "log_evaluation": "service.api.evaluations",
    "retrieval": "service.api.evaluations", "video": "service.api.evaluations",
    "TrainInterrupted": "service.api.training", "train": "service.api.training",
    "train_config": "service.api.training", "SweepResult": "service.api.sweeps",
    "tune": "service.api.sweeps", "PackInterrupted": "service.data.pack",
    "PackResult": "service.data.pack", "EmbedResult": "service.embed",
    "TrainResult": "service.train.driver",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'service.api' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
