"""Datasets and loaders of a run: the training images (procedural set, local folder or fsspec
URL), the labeled evaluation splits, and a resumable per-worker shard sampler."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dino_core.augment import MultiCropAugmentation, eval_transform
from dino_core.augment_batched import BatchedMultiCrop, ToCanvas
from dino_core.data.collate import collate_multicrop
from dino_core.data.folder import IMAGE_EXTENSIONS, ImageFolder, load_rgb
from dino_core.data.procedural import ProceduralShapes
from service import storage
from service.config import DinoConfig

log = logging.getLogger(__name__)
PROCEDURAL = "procedural"
# eval splits are other seeds of the same generator, so they never repeat training images
EVAL_TRAIN_SEED_OFFSET, EVAL_VAL_SEED_OFFSET = 1000, 2000


class RemoteImageFolder(Dataset):
    """Images under an fsspec URL (s3://bucket/prefix, gs://...), labelled by first-level
    folder like ``ImageFolder``; unreadable files give ``None`` and are counted."""

    def __init__(self, url: str, transform: Callable | None = None,
                 size_hint: int | None = None) -> None:
        self.url = url
        self.transform, self.size_hint = transform, size_hint
        fs, root = storage.get_fs(url)
        root = root.rstrip("/")
        files = sorted(
            p for p in fs.find(root) if p.lower().endswith(tuple(IMAGE_EXTENSIONS))
        )
        if not files:
            raise FileNotFoundError(f"no images under {url}")
        rel = [p[len(root) + 1 :] for p in files]
        if all("/" in r for r in rel):
            self.classes = sorted({r.split("/", 1)[0] for r in rel})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[r.split("/", 1)[0]] for r in rel]
        else:
            self.classes, self.labels = [], [-1] * len(rel)
        self.files = files
        self.skipped = 0
        self._fs = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        if self._fs is None:  # one client per process (data loader workers fork)
            self._fs = storage.get_fs(self.url)[0]
        path = self.files[i]
        try:
            image = load_rgb(io.BytesIO(self._fs.cat_file(path)), self.size_hint)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped and counted
            self.skipped += 1
            log.warning("skipping unreadable image %s: %s", path, err)
            return None
        return (self.transform(image) if self.transform else image), self.labels[i]


def open_images(path: str, transform: Callable, size: int, seed: int, cfg: DinoConfig,
                size_hint: int | None = None) -> Dataset:
    """A folder, an fsspec URL, or (``procedural``) the generated set of ``size`` images.

    ``size_hint``: the smallest side the transform needs; large JPEGs are decoded at a
    reduced scale that keeps both sides at least this long (see ``load_rgb``)."""
    if path == PROCEDURAL:
        d = cfg.data
        return ProceduralShapes(size, d.procedural_image_size, d.procedural_classes, seed,
                                transform, difficulty=d.procedural_difficulty, colourful=d.procedural_colourful)
    if "://" in path and not path.startswith("file://"):
        return RemoteImageFolder(path, transform, size_hint)
    return ImageFolder(path.removeprefix("file://"), transform=transform, size_hint=size_hint)


def batched(cfg: DinoConfig) -> bool:
    return cfg.aug.backend in ("auto", "batched")


def canvas_size(cfg: DinoConfig) -> int:
    return cfg.aug.canvas_size or round(cfg.aug.global_size * 8 / 7)


def decode_size_hint(cfg: DinoConfig) -> int:
    """The shortest image side at which no training crop is upsampled.

    Batched: the canvas side (the shorter side is resized to it). Per-image: a
    ``RandomResizedCrop`` of ``size`` px at the smallest scale ``s`` and the narrowest aspect
    ratio (3/4, torchvision's default) spans ``sqrt(s * 3/4)`` of a square image's side, so
    the side must be ``size / sqrt(s * 3/4)``: 496 px for the paper's 96 px local crops at
    scale 0.05, which lets a 6000x4000 JPEG decode at 1/8 scale (750x500).
    """
    a = cfg.aug
    if batched(cfg):
        return canvas_size(cfg)
    return max(math.ceil(size / math.sqrt(scale * 3 / 4))
               for size, scale in ((a.global_size, a.global_scale[0]),
                                   (a.local_size, a.local_scale[0])))


def train_dataset(cfg: DinoConfig) -> Dataset:
    """Per-image backend: items are lists of crops. Batched backend: items are uint8
    canvases, cropped on the device by ``batched_augmentation``."""
    a = cfg.aug
    if batched(cfg):
        tf: Callable = ToCanvas(canvas_size(cfg))
    else:
        tf = MultiCropAugmentation(a.global_size, a.local_size, a.n_local,
                                   tuple(a.global_scale), tuple(a.local_scale))
    d = cfg.data
    return open_images(d.path, tf, d.procedural_size, d.seed, cfg,
                       size_hint=decode_size_hint(cfg))


def batched_augmentation(cfg: DinoConfig) -> BatchedMultiCrop | None:
    if not batched(cfg):
        return None
    a = cfg.aug
    return BatchedMultiCrop(a.global_size, a.local_size, a.n_local, tuple(a.global_scale),
                            tuple(a.local_scale))


def eval_datasets(cfg: DinoConfig) -> tuple[Dataset, Dataset]:
    """The labeled (train, val) splits for k-NN, with Resize + CenterCrop."""
    e, d = cfg.eval, cfg.data
    tf = eval_transform(e.image_size)
    hint = int(e.image_size * 256 / 224)  # eval_transform's resize of the shorter side
    train = open_images(e.train_path, tf, e.procedural_train_size,
                        d.seed + EVAL_TRAIN_SEED_OFFSET, cfg, size_hint=hint)
    val = open_images(e.val_path, tf, e.procedural_val_size, d.seed + EVAL_VAL_SEED_OFFSET, cfg,
                      size_hint=hint)
    return train, val


def eval_loader(ds: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_multicrop)


class ShardSampler(Sampler[int]):
    """This worker's share of a seeded permutation of the dataset, equal-sized across workers
    (like ``DistributedSampler(drop_last=True)``), that can start ``skip`` samples in so a
    run resumed mid-epoch does not see the same images twice."""

    def __init__(self, n: int, rank: int, world: int, seed: int, epoch: int, skip: int = 0):
        self.n, self.rank, self.world = n, rank, world
        self.seed, self.epoch, self.skip = seed, epoch, skip

    def _indices(self) -> np.ndarray:
        perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
        per_rank = self.n // self.world
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return max(self.n // self.world - self.skip, 0)


def train_loader(ds: Dataset, cfg: DinoConfig, rank: int, world: int, epoch: int,
                 skip_batches: int, pin_memory: bool) -> DataLoader:
    """A loader for one epoch. Rebuilt every epoch with a generator seeded by
    (seed, rank, epoch), so augmentations of an epoch do not depend on earlier epochs and a
    run resumed at an epoch boundary sees exactly the same crops."""
    local_batch = cfg.train.batch_size // world
    sampler = ShardSampler(len(ds), rank, world, cfg.train.seed, epoch, skip_batches * local_batch)
    gen = torch.Generator().manual_seed(
        int(np.random.default_rng((cfg.train.seed, rank, epoch, skip_batches)).integers(2**62))
    )
    return DataLoader(ds, batch_size=local_batch, sampler=sampler, drop_last=True,
                      num_workers=cfg.data.num_workers, collate_fn=collate_multicrop,
                      pin_memory=pin_memory, generator=gen,
                      prefetch_factor=4 if cfg.data.num_workers > 0 else None)


def steps_per_epoch(n_images: int, cfg: DinoConfig, world: int) -> int:
    steps = (n_images // world) // (cfg.train.batch_size // world)
    if steps == 0:
        raise ValueError(
            f"{n_images} images are fewer than one global batch of {cfg.train.batch_size}"
        )
    return steps
