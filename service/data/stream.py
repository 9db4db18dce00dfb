"""The streaming reader of packed datasets: each training rank reads its own shards, in a
per-epoch seeded order, through a bounded shuffle buffer, and can resume mid-epoch exactly.

The plan of an epoch, the same on every rank (nothing is listed, the manifest has it all):

- the shards are permuted by ``(seed, epoch)`` and their images concatenated; rank ``r`` owns
  positions ``[r * n // world, ...)``, ``n // world`` of them, of which the first
  ``steps * batch`` are used (the rest, fewer than a global batch, wait for the next epoch's
  order, like ``DistributedSampler(drop_last=True)``). A shard cut by a rank boundary is read
  by both ranks, each for its part;
- a rank's positions are split into ``streams`` contiguous regions, one per loader process;
  stream ``s`` makes the rank's batches ``s, s + streams, s + 2 * streams, ...``, which is the
  order in which a ``DataLoader`` takes batches from its workers;
- each stream fetches its shards one ahead (a local copy, SHA-256 checked), and shuffles
  through a buffer of ``shuffle_buffer`` samples seeded by ``(seed, epoch, rank, stream)``.

So every image is used at most once per epoch and the rank's batch ``k`` is a pure function
of ``(seed, epoch, rank, world, batch, streams, k)``. Resuming at batch ``k``, physical loader
worker ``i`` plays stream ``(i + k) % streams`` and drops the batches that stream made before
``k`` (read, not decoded), so the resumed run gets exactly the batches it would have had.

A damaged shard (checksum mismatch, truncated tar, fewer images than the manifest says) is
named in the log; its missing images become unreadable samples (``None``, counted by the
collate function), so every rank still takes the same number of steps. A shard with more
images than the manifest says is named too; the plan has no place for the extra ones.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dino_core.augment.canvas import ToCanvas
from dino_core.data.folder import load_rgb
from service.data.shards import Manifest, Sample, read_samples, sha256_of
from service.storage import get_fs, is_local, with_retries

log = logging.getLogger(__name__)

MISSING = Sample("?", "", None, -1)


@dataclass(frozen=True)
class Piece:
    """Images ``[start, stop)`` (in stored order) of shard ``shard``."""

    shard: int
    start: int
    stop: int


def cut(counts: list[int], order: list[int], begin: int, end: int) -> list[Piece]:
    """The pieces of positions ``[begin, end)`` of the shards ``order``, concatenated."""
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(begin, offset), min(end, offset + counts[shard])
        if lo < hi:
            pieces.append(Piece(shard, lo - offset, hi - offset))
        offset += counts[shard]
    return pieces


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng((seed, epoch)).permutation(num_shards).tolist()


def stream_batches(steps: int, streams: int, stream: int) -> int:
    """How many of a rank's ``steps`` batches stream ``stream`` makes."""
    return len(range(stream, steps, streams))


def stream_pieces(counts: list[int], seed: int, epoch: int, rank: int, world: int, batch: int,
                  streams: int, stream: int) -> list[Piece]:
    """The pieces stream ``stream`` of ``rank`` reads in ``epoch`` (see the module docstring)."""
    n = sum(counts)
    steps = (n // world) // batch
    begin = rank * (n // world) + batch * sum(stream_batches(steps, streams, s)
                                              for s in range(stream))
    end = begin + batch * stream_batches(steps, streams, stream)
    return cut(counts, shard_order(len(counts), seed, epoch), begin, end)


def shuffled(items: Iterator[Sample], size: int, rng: np.random.Generator,
             initial: int = 64) -> Iterator[Sample]:
    """A shuffle buffer of at most ``size`` samples that starts emitting (a random one per
    sample read) once it holds ``initial``, and grows to ``size`` by reading two samples per
    one emitted: the first batch does not wait for the whole buffer to fill."""
    if size <= 1:  # no shuffling
        yield from items
        return
    buffer: list[Sample] = []
    initial = max(2, min(initial, size))
    for item in items:
        buffer.append(item)
        if len(buffer) < size:
            extra = next(items, None)
            if extra is not None:
                buffer.append(extra)
        if len(buffer) >= initial and len(buffer) > 1:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    order = rng.permutation(len(buffer)) if buffer else []
    yield from (buffer[j] for j in order)


def count_mismatch(name: str, listed: int, real: int, missing: int) -> None:
    """Names a shard whose image count differs from its manifest entry, and goes on: the
    epoch's plan (the same on every rank) was made from the manifest, so images it lacks
    become unreadable samples (counted; ``data.max_unreadable_fraction`` stops a run that
    loses too many) and images it does not list are not used. A DataError here would end
    the whole run from one loader process, mid-epoch, over one manifest entry."""
    fix = f"re-pack, or set its num_images to {real} in manifest.json"
    if real < listed:
        log.warning("shard %s: the manifest says %d images, the shard holds %d; %d missing "
                    "here are counted as unreadable (%s)", name, listed, real, missing, fix)
    else:
        log.warning("shard %s: the manifest says %d images, the shard holds %d; %d of its "
                    "images are not used (%s)", name, listed, real, real - listed, fix)


class ShardStream(IterableDataset):
    """A packed dataset as an ``IterableDataset``; ``configure`` before each epoch's loader.

    Modes: ``train`` (the plan of the module docstring; a ``DataLoader`` over it must have
    ``num_workers == streams``, or 0 for one stream) and ``all`` (every image once, shards
    dealt to loader workers, no shuffle: evaluation splits). With ``raw``, items are the
    encoded bytes (collate with ``collate_encoded``), decoded later on the training device.
    """

    def __init__(self, manifest: Manifest, transform: Callable | None, size_hint: int | None,
                 shuffle_buffer: int = 1024, seed: int = 0, trace_dir: str | None = None,
                 raw: bool = False):
        self.manifest, self.transform, self.size_hint = manifest, transform, size_hint
        self.raw = raw  # items are the encoded bytes, (uint8 (n,), label)
        self.shuffle_buffer, self.seed, self.trace_dir = shuffle_buffer, seed, trace_dir
        self.classes = list(manifest.classes)
        self.counts = [s.num_images for s in manifest.shards]
        self.mode = "all"
        self._fs: Any = None
        # the canvas is a pure function of the image: no per-sample seeding needed
        self.random_transform = transform is not None and not isinstance(transform, ToCanvas)
        self.epoch = self.rank = self.skip_batches = 0
        self.world = self.batch = self.streams = 1

    def __len__(self) -> int:
        return self.manifest.num_images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}  # clients do not cross into loader processes

    def configure(self, *, epoch: int, rank: int, world: int, batch: int, streams: int,
                  skip_batches: int = 0) -> ShardStream:
        self.mode, self.epoch, self.rank, self.world = "train", epoch, rank, world
        self.batch, self.streams, self.skip_batches = batch, streams, skip_batches
        return self

    def __iter__(self) -> Iterator[tuple[Any, int] | None]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.mode == "all":
            pieces = [Piece(i, 0, c) for i, c in enumerate(self.counts)][worker::workers]
            yield from (self.decode(s, None) for s in self.samples(pieces))
            return
        if workers != self.streams:
            raise RuntimeError(f"{workers} loader workers for {self.streams} streams")
        stream = (worker + self.skip_batches) % self.streams
        steps = (len(self) // self.world) // self.batch
        made = len(range(stream, self.skip_batches, self.streams))  # before skip_batches
        total = stream_batches(steps, self.streams, stream) * self.batch
        pieces = stream_pieces(self.counts, self.seed, self.epoch, self.rank, self.world,
                               self.batch, self.streams, stream)
        rng = np.random.default_rng((self.seed, self.epoch, self.rank, stream))
        trace = self._trace(stream)
        try:
            for position, sample in enumerate(shuffled(iter(self.samples(pieces)),
                                                       self.shuffle_buffer, rng)):
                if position >= total:
                    break
                if position < made * self.batch:
                    continue  # consumed before the resume: read again, not decoded
                if trace is not None and sample.data is not None:
                    trace.write(sample.key + "\n")
                    trace.flush()
                yield self.decode(sample, (self.seed, self.epoch, self.rank, stream, position))
        finally:
            if trace is not None:
                trace.close()

    def decode(self, s: Sample, seed_key: tuple | None) -> tuple[Any, int] | None:
        """``(transform(image), label)``, or None for a missing or unreadable image. The
        transform's random draws are seeded per sample (a resumed stream repeats them)."""
        if s.data is None:
            return None
        if self.raw:
            return torch.frombuffer(bytearray(s.data), dtype=torch.uint8), s.label
        try:
            image = load_rgb(io.BytesIO(s.data), self.size_hint)
        except Exception as exc:  # decoders raise many types
            log.warning("skipping unreadable image %s of %s: %s", s.key, self.manifest.prefix,
                        exc)
            return None
        if self.transform is None:
            return image, s.label
        if seed_key is not None and self.random_transform:
            # the CPU generator alone: torch.manual_seed also seeds (lazily) every
            # accelerator, ~1 ms a call
            torch.random.default_generator.manual_seed(
                int(np.random.default_rng(seed_key).integers(2**62)))
        return self.transform(image), s.label

    def samples(self, pieces: list[Piece]) -> Iterator[Sample]:
        """The samples of ``pieces`` in order, fetching the next shard while one is read."""
        tmp = tempfile.mkdtemp(prefix="dino-shards-")
        try:
            with ThreadPoolExecutor(1) as pool:
                ahead: deque[Future] = deque()
                for i, piece in enumerate(pieces):
                    while len(ahead) < 2 and i + len(ahead) < len(pieces):
                        ahead.append(pool.submit(self.fetch, pieces[i + len(ahead)], tmp))
                    local = ahead.popleft().result()
                    yield from self.read_piece(piece, local)
                    if local is not None and local.startswith(tmp):
                        os.remove(local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def fetch(self, piece: Piece, tmp: str) -> str | None:
        """A checked local copy of the piece's shard (a local shard is read in place); None
        if it is damaged."""
        info = self.manifest.shards[piece.shard]
        url = self.manifest.url(info)
        try:
            if is_local(url):
                local = url.removeprefix("file://")
            else:
                if self._fs is None:  # one client per loader process (a new one is ~0.5 s)
                    self._fs = get_fs(url)[0]
                fs, path = self._fs, url.split("://", 1)[1]
                local = os.path.join(tmp, info.name)
                with_retries(lambda: fs.get_file(path, local), f"download of {url}", url=url)
            with open(local, "rb") as f:
                digest = sha256_of(f)
        except OSError as err:  # FileNotFoundError included
            log.warning("skipping shard %s: %s; its %d images are counted as unreadable",
                        url, err, piece.stop - piece.start)
            return None
        if digest != info.sha256:
            log.warning("skipping damaged shard %s: its SHA-256 does not match the manifest; "
                        "its %d images are counted as unreadable", url, piece.stop - piece.start)
            return None
        return local

    def read_piece(self, piece: Piece, local: str | None) -> Iterator[Sample]:
        """The piece's samples; the ones its shard lacks (damaged, or fewer than the
        manifest says) become ``MISSING``, so every rank still takes the plan's steps."""
        wanted = piece.stop - piece.start
        got = 0
        if local is not None:
            got = yield from self._read_checked(piece, local)
        for _ in range(wanted - got):
            yield MISSING

    def _read_checked(self, piece: Piece, local: str) -> Generator[Sample, None, int]:
        """Yields the piece's samples from the local shard; returns how many. The manifest's
        count is only known to be wrong where the shard is read through (its tar ends inside
        the piece, or has more after a piece that ends at the manifest's count): then the
        shard, the manifest's count and the real one are named, and the run goes on (see
        ``count_mismatch``)."""
        info = self.manifest.shards[piece.shard]
        got = seen = 0
        try:
            with open(local, "rb") as f:
                samples = read_samples(f)
                for sample in samples:
                    seen += 1
                    if seen > piece.stop:
                        if piece.stop == info.num_images:  # more than the manifest says
                            real = seen + sum(1 for _ in samples)
                            count_mismatch(info.name, info.num_images, real, 0)
                        return got
                    if seen > piece.start:
                        got += 1
                        yield sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            log.warning("shard %s is damaged after %d images: %s", info.name, got, err)
            if got < piece.stop - piece.start:
                log.warning("shard %s: %d of its images are missing; counted as unreadable",
                            info.name, piece.stop - piece.start - got)
            return got
        if got < piece.stop - piece.start:  # the tar ended early: it holds ``seen`` images
            count_mismatch(info.name, info.num_images, seen, piece.stop - piece.start - got)
        return got

    def _trace(self, stream: int):
        if not self.trace_dir:
            return None
        os.makedirs(self.trace_dir, exist_ok=True)
        name = f"epoch{self.epoch}-rank{self.rank}-stream{stream}-skip{self.skip_batches}.txt"
        return open(os.path.join(self.trace_dir, name), "a")
