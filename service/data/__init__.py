"""The data of runs and evaluations: datasets by typed source (``datasets``, ``remote``) and
loaders with a resumable per-worker sampler (``loaders``)."""

from service.data.datasets import (
    EVAL_TRAIN_SEED_OFFSET,
    EVAL_VAL_SEED_OFFSET,
    align_classes,
    batched_augmentation,
    decode_size_hint,
    eval_datasets,
    eval_split,
    num_classes,
    open_images,
    train_dataset,
)
from service.data.loaders import ShardSampler, eval_loader, steps_per_epoch, train_loader
from service.data.remote import RemoteImageFolder

__all__ = [
    "align_classes",
    "EVAL_TRAIN_SEED_OFFSET",
    "EVAL_VAL_SEED_OFFSET",
    "RemoteImageFolder",
    "ShardSampler",
    "batched_augmentation",
    "decode_size_hint",
    "eval_datasets",
    "eval_split",
    "eval_loader",
    "num_classes",
    "open_images",
    "steps_per_epoch",
    "train_dataset",
    "train_loader",
]
