"""Evaluations of a checkpoint, run folder or exported backbone: k-NN (``knn``), linear probe
(``linear``), attention maps and mask Jaccard (``attention``), export (``backbone``), and
logging results to the run's MLflow run (``tracked``)."""

from service.evaluate.backbone import (
    WEIGHTS,
    checkpoint_config,
    checkpoint_step,
    export_backbone,
    load_backbone,
)
from service.evaluate.knn import knn_eval, labeled_split
from service.evaluate.linear import linear_eval
from service.evaluate.tracked import log_to_checkpoint_run

__all__ = [
    "WEIGHTS",
    "checkpoint_config",
    "checkpoint_step",
    "export_backbone",
    "knn_eval",
    "labeled_split",
    "linear_eval",
    "load_backbone",
    "log_to_checkpoint_run",
]
