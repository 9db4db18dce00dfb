"""Loaders of a run: the per-epoch training loader over a resumable per-worker shard
sampler, the evaluation loader, and the number of steps an epoch has."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dino_core.data.collate import collate_multicrop
from service.config import DinoConfig
from service.data.stream import ShardStream
from service.errors import DataError


def eval_loader(ds: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_multicrop)


class ShardSampler(Sampler[int]):
    """This worker's share of a seeded permutation of the dataset, laid out by global batch:
    global batch ``k`` is ``perm[k * B : (k + 1) * B]`` whatever the world size, and rank
    ``r`` of ``world`` takes its ``r``-th slice of ``batch = B / world`` images. So a run
    resumed mid-epoch at batch ``k`` (``skip_batches``), with the same or another number of
    workers (an elastic group that grew or shrank), uses every image of the epoch exactly
    once; the last ``n mod B`` images of the permutation are dropped, as
    ``DistributedSampler(drop_last=True)`` drops a remainder."""

    def __init__(self, n: int, rank: int, world: int, seed: int, epoch: int, batch: int,
                 skip_batches: int = 0):
        self.n, self.rank, self.world, self.batch = n, rank, world, batch
        self.seed, self.epoch, self.skip_batches = seed, epoch, skip_batches

    def _indices(self) -> np.ndarray:
        perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
        steps = self.n // (self.batch * self.world)
        by_batch = perm[: steps * self.batch * self.world].reshape(steps, self.world, self.batch)
        return by_batch[self.skip_batches :, self.rank].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        steps = self.n // (self.batch * self.world)
        return max(steps - self.skip_batches, 0) * self.batch


def collate_encoded(batch: list[tuple[torch.Tensor, int] | None]
                    ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Encoded images (uint8 ``(n_i,)`` each) stay a list; missing ones are dropped."""
    kept = [item for item in batch if item is not None]
    labels = torch.as_tensor([int(y) for _, y in kept], dtype=torch.long)
    return [x for x, _ in kept], labels, len(batch) - len(kept)


def loader_streams(cfg: DinoConfig) -> int:
    """Streams of a packed dataset per rank: one per loader process."""
    return max(1, cfg.data.num_workers)


def train_loader(ds: Dataset, cfg: DinoConfig, rank: int, world: int, epoch: int,
                 skip_batches: int, pin_memory: bool, streams: int | None = None) -> DataLoader:
    """A loader for one epoch. Rebuilt every epoch with a generator seeded by
    (seed, rank, epoch), so augmentations of an epoch do not depend on earlier epochs and a
    run resumed at an epoch boundary sees exactly the same crops.

    A packed dataset is read by ``streams`` loader processes (default ``loader_streams``);
    a run resumed mid-epoch passes the count its epoch started with."""
    local_batch = cfg.train.batch_size // world
    if isinstance(ds, ShardStream):
        streams = streams or loader_streams(cfg)
        ds.configure(epoch=epoch, rank=rank, world=world, batch=local_batch, streams=streams,
                     skip_batches=skip_batches)
        workers = streams if streams > 1 or cfg.data.num_workers else 0
        return DataLoader(ds, batch_size=local_batch, num_workers=workers,
                          collate_fn=collate_encoded if ds.raw else collate_multicrop,
                          pin_memory=pin_memory and not ds.raw,
                          prefetch_factor=4 if workers else None)
    sampler = ShardSampler(len(ds), rank, world, cfg.train.seed, epoch, local_batch,
                           skip_batches)
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
