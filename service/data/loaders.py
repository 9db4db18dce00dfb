"""Loaders of a run: the per-epoch training loader over a resumable per-worker shard
sampler, the evaluation loader, and the number of steps an epoch has."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dino_core.data.collate import collate_multicrop
from service.config import DinoConfig
from service.errors import DataError


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
        raise DataError(
            f"{n_images} images are fewer than one global batch of {cfg.train.batch_size}"
        )
    return steps
