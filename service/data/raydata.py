"""Training images as a ``ray.data.Dataset`` (``data.loader=ray_data``): the files are read and
decoded to uint8 canvases by Ray Data CPU tasks, which may run on other nodes than the GPU
workers; each worker only stacks batches (``train_batches``).

Sources: a packed set (WebDataset tar shards and ``manifest.json``, ``service.data.shards``),
read with ``ray.data.read_webdataset(decoder=None)`` (raw member bytes; Ray's own decoder would
turn images into arrays first); or a folder / fsspec URL of image files, read with
``ray.data.read_binary_files(include_paths=True)`` and labelled by first-level folder as
``ImageFolder`` does. s3:// goes through ``service.storage.arrow.pyarrow_fs``: the project's
fsspec client (AWS_ENDPOINT_URL and the AWS variables honoured), retried through outages.

Unreadable images are dropped: the decode task logs a warning naming each one (Ray forwards
task logs to the driver); their number is ``count_images(src)`` minus the rows delivered.

How Ray Train splits the data (read in ray 2.60.0, ``ray/train/_internal/data_config.py``;
https://docs.ray.io/en/latest/train/api/doc/ray.train.DataConfig.html and
https://docs.ray.io/en/latest/data/api/doc/ray.data.Dataset.streaming_split.html):
``TorchTrainer(datasets={"train": ds})`` uses ``DataConfig()`` unless given another, whose
``datasets_to_split="all"`` makes ``configure`` call ``ds.streaming_split(world_size,
equal=True, locality_hints=<worker node ids>)``. With ``equal=True`` "each output iterator sees
an exactly equal number of rows, dropping data if necessary": each of W workers gets
``floor(R / W)`` rows per epoch, R being the rows left after unreadable images are dropped,
and the last ``R mod W`` are truncated (``OutputSplitter``). So every rank can take
``floor(floor(R / W) / local_batch)`` steps; computed from ``count_images`` (R + skipped),
the step count is right only when nothing was dropped, else ``train_batches`` raises
``DataError`` on every rank at the same step (the split is equal, so no rank hangs). Seen
here: a 2-worker ``TorchTrainer`` given 11 readable images had 5 rows on each rank, two epochs
running (each epoch re-runs the read and decode, as Ray Data does; ``materialize()`` a small
set to decode it once). A local folder is read by whichever node runs the task: on a
multi-node cluster it must be on a shared filesystem, or be a URL.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dino_core.augment.canvas import decode_to_canvas
from dino_core.data.folder import IMAGE_EXTENSIONS, ImageFiles, ImageFolder, load_rgb
from service.data.remote import RemoteImageFolder
from service.data.shards import is_packed, read_manifest
from service.errors import DataError
from service.logs import route_worker_logs
from service.storage import get_fs, is_local, join
from service.storage.arrow import pyarrow_fs

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.data

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
IMG = "img"  # every image member of a shard is renamed {key}.img: one column, whatever its ext
DECODE_BATCH = 32  # images per decode call: 32 canvases of 256 px are ~6 MB


def count_images(url_or_path: str) -> int:
    """Images of a source (one listing for folders/URLs; the manifest's count when packed)."""
    if is_packed(url_or_path):
        return read_manifest(url_or_path).num_images
    return len(_listing(url_or_path)[0])


def ray_dataset(url_or_path: str, canvas_size: int, *, shard_urls: list[str] | None = None,
                classes: list[str] | None = None, num_cpus_per_task: float = 1.0,
                shuffle_files: bool = True) -> ray.data.Dataset:
    """The images of a source as rows ``{"image": uint8 (3, canvas_size, canvas_size),
    "label": int64}`` (-1 when unlabelled); unreadable images are dropped (warned, by name).

    Args:
        url_or_path: A packed set's prefix, or a folder / fsspec URL of images.
        canvas_size: Side of the canvas (``decode_to_canvas``); also the JPEG draft size.
        shard_urls: The shards to read (full URLs, or names relative to the prefix); default:
            every shard of the manifest. Given, the source is read as packed.
        classes: The class list labels must index (e.g. another split's), matched by name;
            default: the source's own (the manifest's, or the sorted first-level folders).
        num_cpus_per_task: CPUs of each read and decode task.
        shuffle_files: Read shards / files in a new random order each epoch (execution).

    Raises:
        DataError: No images, or the source has a class that ``classes`` lacks.
    """
    if canvas_size < 1:
        raise DataError(f"canvas_size must be >= 1, got {canvas_size}")
    packed = is_packed(url_or_path)
    read_shards = shard_urls is not None or packed
    # every check (listing, manifest, classes) before Ray Data is imported or touched: a
    # reader of Ray Data starts a local Ray when none is running
    if read_shards:
        manifest = read_manifest(url_or_path) if packed else None
        own = list(manifest.classes) if manifest else list(classes or [])
        prefix = manifest.prefix if manifest else url_or_path
        urls = shard_urls if shard_urls is not None else [manifest.url(s) for s in manifest.shards]
        if not urls:
            raise DataError(f"{url_or_path}: a packed set without shards")
        root = None
    else:
        samples, own, root = _listing(url_or_path)
    decode = _Decode(canvas_size, own, _label_table(url_or_path, own, classes), root)

    import ray.data

    shuffle = "files" if shuffle_files else None
    if read_shards:
        fs, paths = _filesystem([_shard_url(prefix, u) for u in urls])
        ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None,
                                      filerename=_rename_image, suffixes=[IMG, "cls"],
                                      shuffle=shuffle, num_cpus=num_cpus_per_task)
    else:
        fs, (read_root,) = _filesystem([url_or_path])
        # Ray lists a folder in one call but leaves out names starting with "_" ("." too,
        # as we do); only then give it our listing (one stat per file, parallel for URLs)
        underscore = any(p[len(root) + 1:].startswith("_") for p, _ in samples)
        read = [p for p, _ in samples] if underscore else read_root
        ds = ray.data.read_binary_files(read, include_paths=True, filesystem=fs,
                                        file_extensions=sorted(IMAGE_SUFFIXES),
                                        shuffle=shuffle, num_cpus=num_cpus_per_task)
    return ds.map_batches(decode, batch_size=DECODE_BATCH, batch_format="numpy",
                          num_cpus=num_cpus_per_task)


def train_batches(shard: Any, local_batch: int, steps: int, *, prefetch_batches: int = 2,
                  local_shuffle_buffer_size: int | None = None,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Exactly ``steps`` batches ``(images uint8 (B, 3, S, S), labels int64 (B,), 0)`` of
    ``B = local_batch`` from a worker's shard (``ray.train.get_dataset_shard("train")``, or
    anything with ``iter_torch_batches``): the tuple ``collate_multicrop`` gives the loop, with
    0 skipped (unreadable images never reach the shard). Tensors stay on the CPU.

    Raises:
        DataError: The shard ran out first (DDP ranks must all take ``steps`` steps).
    """
    batches = iter(shard.iter_torch_batches(
        batch_size=local_batch, drop_last=True, prefetch_batches=prefetch_batches,
        device="cpu", dtypes={"image": torch.uint8, "label": torch.int64},
        local_shuffle_buffer_size=local_shuffle_buffer_size))
    try:
        for step in range(steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise DataError(
                    f"the training data ran out after {step} of {steps} batches of "
                    f"{local_batch}: this worker's share holds fewer than {steps * local_batch} "
                    "readable images (Ray Train gives each of W workers floor(rows / W); "
                    "unreadable images are dropped, see the warnings)") from None
            yield batch["image"], batch["label"], 0
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # stop its prefetching now, not when it is collected
            close()


def _listing(url_or_path: str) -> tuple[list[tuple[str, int]], list[str], str]:
    """``(samples, classes, root)`` of a folder or URL, listed as the DataLoader path lists
    them; paths and root in the form Ray reports paths (absolute; for URLs, inside the
    filesystem)."""
    try:
        if is_local(url_or_path):
            root = os.path.abspath(url_or_path.removeprefix("file://"))
            found: ImageFiles = ImageFolder(root)
        else:
            root = get_fs(url_or_path)[1].rstrip("/")
            found = RemoteImageFolder(url_or_path)
    except (FileNotFoundError, ValueError) as err:  # DataError is a ValueError
        raise DataError(str(err)) from err
    return found.samples, list(found.classes), root


def _shard_url(prefix: str, url: str) -> str:
    if "://" in url or os.path.isabs(url):
        return url
    return join(prefix, url)


def _filesystem(urls: list[str]) -> tuple[pyarrow.fs.FileSystem | None, list[str]]:
    """``(filesystem, paths)`` for Ray's readers: local paths made absolute (Ray's workers
    run elsewhere), URLs through the retrying fsspec handler (one client for all)."""
    if all(is_local(u) for u in urls):
        return None, [os.path.abspath(u.removeprefix("file://")) for u in urls]
    fs, _ = pyarrow_fs(urls[0])
    return fs, [get_fs(u)[1] for u in urls]


def _label_table(src: str, own: list[str], wanted: list[str] | None) -> list[int] | None:
    """``table[own label] = label in wanted``; None when they are the same list."""
    if wanted is None or list(wanted) == own or not own:
        return None
    index = {name: i for i, name in enumerate(wanted)}
    missing = [name for name in own if name not in index]
    if missing:
        raise DataError(f"{src} has classes that the given class list lacks: "
                        f"{', '.join(missing[:10])}")
    return [index[name] for name in own]


def _rename_image(name: str) -> str:
    """``000000042.jpg`` -> ``000000042.img`` (module level: Ray pickles it into tasks)."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{IMG}" if dot and ext.lower() in IMAGE_SUFFIXES else name


class _Decode:
    """The ``map_batches`` function: bytes to canvases, labels from ``.cls`` or the path."""

    def __init__(self, canvas_size: int, classes: list[str], table: list[int] | None,
                 root: str | None) -> None:
        self.size, self.table, self.root = canvas_size, table, root
        self.index = {name: i for i, name in enumerate(classes)}

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        route_worker_logs()  # in Ray's task: its "skipping unreadable image" lines reach the driver
        if self.root is None:  # packed
            names = [f"{u}:{k}" for u, k in zip(batch["__url__"], batch["__key__"])]
            blobs = list(batch.get(IMG, [None] * len(names)))
            labels: list[Any] = list(batch.get("cls", [None] * len(names)))
        else:
            names = [str(p) for p in batch["path"]]
            blobs = list(batch["bytes"])
            labels = [self._path_label(p) for p in names]
        images, kept = [], []
        for name, blob, label in zip(names, blobs, labels):
            if label is None and self.root is not None:  # not an image ImageFolder lists
                continue
            try:
                label = self._relabel(_cls_label(label) if self.root is None else label)
                if not isinstance(blob, bytes | bytearray):
                    raise ValueError("no image member")
                image = load_rgb(io.BytesIO(blob), size_hint=self.size)
            except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ...)
                log.warning("skipping unreadable image %s: %s: %s", name, type(exc).__name__,
                            exc)
                continue
            # outside the try: a bug in the canvas must fail loudly, not skip data
            images.append(decode_to_canvas(image, self.size).numpy())
            kept.append(label)
        if images:  # nothing for a batch of unreadable files: Ray cannot type an empty tensor
            yield {"image": np.stack(images), "label": np.asarray(kept, dtype=np.int64)}

    def _path_label(self, path: str) -> int | None:
        """The folder's class; None for a file the listing left out (hidden, or added
        since outside every class folder)."""
        parts = path[len(self.root) + 1:].split("/")
        if any(p.startswith(".") for p in parts) or (self.index and len(parts) < 2):
            return None
        return self.index.get(parts[0]) if self.index else -1

    def _relabel(self, label: int) -> int:
        if label < 0 or self.table is None:
            return label
        if label >= len(self.table):
            raise ValueError(f"label {label} is not one of the {len(self.table)} classes")
        return self.table[label]


def _cls_label(value: Any) -> int:
    """A ``.cls`` member (ASCII decimal); -1 without one (an unlabelled set)."""
    if isinstance(value, bytes | bytearray):
        return int(value.decode("ascii").strip())
    return -1
