"""The Ray Data CPU tasks of a job: encoded images to uint8 centre crops.

Each output batch is ``{"key": str (B,), "label": int64 (B,) (-1: none), "image": uint8
(B, 3, S, S), "error": str (B,)}``; an unreadable image keeps its row, with a blank image and
the reason in ``error``, so that the driver can count and list it.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dino_core.data.folder import load_rgb
from service.data.shards import read_samples
from service.embed.sources import key_path
from service.embed.spec import split_transform
from service.errors import StorageError
from service.storage import get_fs, is_local, is_transient, read_bytes

DECODE_BATCH = 32  # images per output batch by default: 32 crops of 224 px are 4.8 MB


class Crops:
    """Accumulates crops into output batches of ``rows`` rows."""

    def __init__(self, side: int, rows: int = DECODE_BATCH) -> None:
        self.side, self.size = side, rows
        self.head = split_transform(side)[0]
        self.rows: list[tuple[str, int, np.ndarray | None, str]] = []

    def add(self, key: str, label: int, blob: bytes | None, error: str = "") -> None:
        image, raw = None, None
        if not error:
            try:
                if not blob:
                    raise ValueError("no image data")
                raw = io.BytesIO(blob)
                rgb = load_rgb(raw)
            except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ...)
                # Pillow names the file by the repr of the buffer it was given
                error = f"{type(exc).__name__}: {exc}".replace(repr(raw), repr(key))
            else:
                # outside the try: a bug in the transform must fail loudly, not skip data
                image = torch.as_tensor(self.head(rgb)).numpy()
        self.rows.append((key, label, image, error))

    def full(self) -> bool:
        return len(self.rows) >= self.size

    def take(self) -> dict[str, np.ndarray]:
        blank = np.zeros((3, self.side, self.side), np.uint8)
        keys, labels, images, errors = zip(*self.rows)
        self.rows = []
        return {"key": np.array(keys, dtype=object),
                "label": np.array(labels, dtype=np.int64),
                "image": np.stack([blank if im is None else im for im in images]),
                "error": np.array(errors, dtype=object)}


def decode_files(batch: dict[str, np.ndarray], root: str, side: int, rows: int = DECODE_BATCH
                 ) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` function over rows ``{"key", "label"}`` of a folder or URL; output
    batches of ``rows``."""
    crops = Crops(side, rows)
    fs = None if is_local(root) else get_fs(root)[0]  # one client for the batch
    for key, label in zip(batch["key"], batch["label"]):
        try:
            blob, error = read_bytes(key_path(root, str(key)), fs), ""
        except OSError as exc:  # vanished since the listing, no access
            blob, error = None, f"{type(exc).__name__}: {exc}"
        except StorageError as exc:
            cause = exc.__cause__  # an object gone since the listing, or no access: skipped
            if not isinstance(cause, OSError) or is_transient(cause):
                raise  # storage down past its retries, no credentials: the job stops
            blob, error = None, f"{type(cause).__name__}: {cause}"
        crops.add(str(key), int(label), blob, error)
        if crops.full():
            yield crops.take()
    if crops.rows:
        yield crops.take()


def decode_shards(batch: dict[str, np.ndarray], side: int, done: Any = frozenset(),
                  rows: int = DECODE_BATCH) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` function over rows ``{"shard": URL}`` of a packed set: every member
    whose key is not in ``done`` (a set, or a Ray object reference to one), in output
    batches of ``rows``. A damaged shard's images after the damage are one row keyed by
    the shard's name."""
    if not isinstance(done, frozenset | set):
        import ray

        done = ray.get(done)
    crops = Crops(side, rows)
    for url in batch["shard"]:
        url = str(url)
        try:
            with _open(url) as f:
                for s in read_samples(f, stream=not is_local(url)):
                    key = f"{s.key}.{s.ext}" if s.ext else s.key
                    if key in done:
                        continue
                    crops.add(key, s.label, s.data)
                    if crops.full():
                        yield crops.take()
        except (tarfile.TarError, EOFError, OSError) as exc:  # a damaged shard
            name = url.rsplit("/", 1)[-1]
            if name not in done:
                crops.add(name, -1, None, f"damaged shard, images after the damage lost: "
                                          f"{type(exc).__name__}: {exc}")
    if crops.rows:
        yield crops.take()


def _open(url: str):
    if is_local(url):
        return open(url.removeprefix("file://"), "rb")
    fs, path = get_fs(url)
    return fs.open(path, "rb", block_size=8 * 2**20)
