"""The datasets of a run: the training images (procedural set, local folder or fsspec URL)
with their augmentation, and the labeled evaluation splits."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict

from torch.utils.data import Dataset

from dino_core.augment.batched import BatchedMultiCrop, ToCanvas
from dino_core.augment.per_image import MultiCropAugmentation, eval_transform
from dino_core.data.folder import ImageFolder
from dino_core.data.procedural import ProceduralShapes
from service.config import (
    DataSource,
    DinoConfig,
    FolderSource,
    ProceduralSource,
    ShardsSource,
    UrlSource,
    multicrop_spec,
)
from service.data.remote import RemoteImageFolder
from service.data.shards import is_packed, read_manifest, shard_prefix
from service.data.stream import ShardStream
from service.errors import DataError

log = logging.getLogger(__name__)

# eval splits are other seeds of the same generator, so they never repeat training images
EVAL_TRAIN_SEED_OFFSET, EVAL_VAL_SEED_OFFSET = 1000, 2000


def open_images(source: DataSource, transform: Callable | None, size: int, seed: int,
                cfg: DinoConfig, size_hint: int | None = None, raw: bool = False) -> Dataset:
    """The images of ``source``; for the procedural set, ``size`` images of ``seed``. A
    folder or URL holding a ``manifest.json`` is read as the packed dataset it is.

    ``size_hint``: the smallest side the transform needs; large JPEGs are decoded at a
    reduced scale that keeps both sides at least this long (see ``load_rgb``).
    ``raw``: packed data only: items are the encoded bytes (decoded on the device)."""
    if isinstance(source, FolderSource | UrlSource) and is_packed(str(source)):
        source = ShardsSource(str(source))
    match source:
        case ShardsSource(location):
            d = cfg.data
            return ShardStream(read_manifest(location), transform, size_hint,
                               shuffle_buffer=d.shuffle_buffer, seed=cfg.train.seed,
                               trace_dir=d.trace_dir, raw=raw)
        case ProceduralSource():
            d = cfg.data
            return ProceduralShapes(size, d.procedural_image_size, d.procedural_classes, seed,
                                    transform, difficulty=d.procedural_difficulty,
                                    colourful=d.procedural_colourful)
        case UrlSource(url):
            try:
                return RemoteImageFolder(url, transform, size_hint)
            except NotADirectoryError:
                raise DataError(not_a_data_folder(url)) from None
        case FolderSource(path):
            if os.path.isfile(path):
                raise DataError(not_a_data_folder(path))
            return ImageFolder(path, transform=transform, size_hint=size_hint)
    raise TypeError(f"unknown data source {source!r}")


def not_a_data_folder(location: str) -> str:
    """The message for data given as one file: one shard of a packed dataset (its prefix is
    what reads it), or any other file. ``ImageFolder`` would say the folder does not exist,
    about a file that does."""
    prefix = shard_prefix(location)
    if prefix is not None:
        return (f"{location} is one shard of the packed dataset {prefix}: give the packed "
                f"dataset's prefix, {prefix}, which reads every shard through its manifest")
    return (f"{location} is a file, not a folder of images: give the folder that holds the "
            "images, or a packed dataset's prefix (`dino data pack SRC DEST`)")


def batched(cfg: DinoConfig) -> bool:
    return cfg.aug.backend in ("auto", "batched")


def canvas_size(cfg: DinoConfig) -> int:
    return cfg.aug.canvas_size or round(cfg.aug.global_size * 8 / 7)


def full_image_side(cfg: DinoConfig) -> int:
    """The shorter side full images are decoded down to: the per-image backend's decode size
    (below), at which no crop of the paper's scales is upsampled (496 px for 96 px local
    crops at scale 0.05); ImageNet's ~500x375 photos keep their resolution."""
    a = cfg.aug
    return max(math.ceil(size / math.sqrt(scale * 3 / 4))
               for size, scale in ((a.global_size, a.global_scale[0]),
                                   (a.local_size, a.local_scale[0])))


def decode_size_hint(cfg: DinoConfig) -> int:
    """The shortest image side at which no training crop is upsampled.

    Batched: the canvas side (the shorter side is resized to it). Per-image: a
    ``RandomResizedCrop`` of ``size`` px at the smallest scale ``s`` and the narrowest aspect
    ratio (3/4, torchvision's default) spans ``sqrt(s * 3/4)`` of a square image's side, so
    the side must be ``size / sqrt(s * 3/4)``: 496 px for the paper's 96 px local crops at
    scale 0.05, which lets a 6000x4000 JPEG decode at 1/8 scale (750x500).
    """
    return canvas_size(cfg) if batched(cfg) else full_image_side(cfg)


def full_image(cfg: DinoConfig, device_type: str) -> bool:
    """Whether crops are cut from each full image decoded on the device (``aug.crop_source``)
    rather than from canvases decoded in the loader."""
    source = cfg.aug.crop_source
    if not batched(cfg) or source == "canvas" or cfg.data.loader == "ray_data":
        return False
    packed = isinstance(cfg.data.source, ShardsSource) or (
        not isinstance(cfg.data.source, ProceduralSource) and is_packed(cfg.data.path))
    if source == "full_image" and not packed:
        raise DataError("aug.crop_source=full_image needs a packed dataset in data.path "
                        "(`dino data pack SRC DEST`)")
    return packed and (source == "full_image" or device_type == "cuda")


def train_dataset(cfg: DinoConfig, raw: bool = False) -> Dataset:
    """Per-image backend: items are lists of crops. Batched backend: items are uint8
    canvases, cropped on the device by ``batched_augmentation``; with ``raw`` (packed data),
    the encoded images, decoded and cropped on the device."""
    if raw:
        d = cfg.data
        return open_images(d.source, None, d.procedural_size, d.seed, cfg, raw=True)
    if batched(cfg):
        tf: Callable = ToCanvas(canvas_size(cfg))
    else:
        tf = MultiCropAugmentation(**asdict(multicrop_spec(cfg)))
    d = cfg.data
    return open_images(d.source, tf, d.procedural_size, d.seed, cfg,
                       size_hint=decode_size_hint(cfg))


def batched_augmentation(cfg: DinoConfig) -> BatchedMultiCrop | None:
    if not batched(cfg):
        return None
    return BatchedMultiCrop(**asdict(multicrop_spec(cfg)))


def eval_split(cfg: DinoConfig, source: DataSource, train: bool, transform: Callable,
               size_hint: int | None = None) -> Dataset:
    """A labeled split; the procedural one is the run's set on the split's own seed."""
    e, d = cfg.eval, cfg.data
    seed = d.seed + (EVAL_TRAIN_SEED_OFFSET if train else EVAL_VAL_SEED_OFFSET)
    size = e.procedural_train_size if train else e.procedural_val_size
    return open_images(source, transform, size, seed, cfg, size_hint=size_hint)


def eval_datasets(cfg: DinoConfig) -> tuple[Dataset, Dataset]:
    """The labeled (train, val) splits for k-NN, with Resize + CenterCrop."""
    e = cfg.eval
    tf = eval_transform(e.image_size)
    hint = int(e.image_size * 256 / 224)  # eval_transform's resize of the shorter side
    return (eval_split(cfg, e.train_source, True, tf, hint),
            eval_split(cfg, e.val_source, False, tf, hint))


def num_classes(*splits: Dataset) -> int:
    """Classes of labeled splits (procedural sets and image folders both list ``classes``).

    Raises:
        DataError: a split has no classes (no class sub-folders).
    """
    counts = [len(getattr(ds, "classes", []) or []) for ds in splits]
    if min(counts) == 0:
        raise DataError("a labeled split needs one sub-folder per class")
    return max(counts)


def align_classes(train: Dataset, val: Dataset) -> None:
    """Relabels ``val`` by class *name* to ``train``'s labels, in place. Folders are labelled
    by sorted position, which differs when the splits' class sets differ (then 'bee' of a val
    folder without 'ant' would be scored as train's 'ant'). Val images of classes the train
    split lacks are left out, with a warning.

    Raises:
        DataError: a split has no classes, or the two share no class name.
    """
    num_classes(train, val)
    train_names, val_names = list(train.classes), list(val.classes)  # type: ignore[attr-defined]
    if train_names == val_names:
        return
    index = {name: i for i, name in enumerate(train_names)}
    if not set(index) & set(val_names):
        raise DataError(f"the train and val splits share no class: train has "
                        f"{', '.join(train_names[:5])}, val has {', '.join(val_names[:5])}")
    if not hasattr(val, "samples"):
        raise DataError("the val split's classes differ from the train split's")
    missing = sorted(set(val_names) - set(index))
    if missing:
        log.warning("val classes missing from the train split are left out: %s",
                    ", ".join(missing[:20]))
    val.samples = [(path, index[val_names[y]]) for path, y in val.samples  # type: ignore[attr-defined]
                   if val_names[y] in index]
    val.classes = train_names  # type: ignore[attr-defined]
