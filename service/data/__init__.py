"""The data of runs and evaluations: datasets by typed source (``datasets``, ``remote``),
packed datasets (``shards``: the format; ``pack``: writing them; ``stream``: reading them),
loaders with a resumable per-worker sampler (``loaders``) and Ray Data ingest
(``raydata``)."""

from service.data.datasets import (
    EVAL_TRAIN_SEED_OFFSET,
    EVAL_VAL_SEED_OFFSET,
    align_classes,
    batched,
    batched_augmentation,
    canvas_size,
    decode_size_hint,
    eval_datasets,
    eval_split,
    full_image,
    full_image_side,
    num_classes,
    open_images,
    train_dataset,
)
from service.data.loaders import (
    ShardSampler,
    collate_encoded,
    eval_loader,
    loader_streams,
    steps_per_epoch,
    train_loader,
)
from service.data.raydata import count_images, ray_dataset, train_batches
from service.data.remote import RemoteImageFolder
from service.data.shards import Manifest, is_packed, read_manifest
from service.data.stream import ShardStream

__all__ = [
    "Manifest",
    "ShardStream",
    "align_classes",
    "batched",
    "collate_encoded",
    "full_image",
    "full_image_side",
    "is_packed",
    "loader_streams",
    "read_manifest",
    "EVAL_TRAIN_SEED_OFFSET",
    "EVAL_VAL_SEED_OFFSET",
    "RemoteImageFolder",
    "ShardSampler",
    "batched_augmentation",
    "canvas_size",
    "count_images",
    "ray_dataset",
    "train_batches",
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
