"""Images under an fsspec URL (``s3://bucket/prefix``, ``gs://...``), one object each: the
same dataset as ``dino_core``'s local ``ImageFolder`` (same attributes, same labelling of
empty class folders, same skipping of unreadable files), read through fsspec; and the listing
of any image source (a folder or a URL) that ``dino data pack`` plans its shards from."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from dino_core.data.folder import ImageFiles, ImageFolder, is_image_name, label_by_first_folder
from service.config.sources import FolderSource, parse_source
from service.data.shards import shard_prefix
from service.errors import DataError
from service.storage import get_fs, with_retries


def list_images(url: str) -> tuple[list[tuple[str, int]], list[str], list[int]]:
    """``(samples, classes, sizes)`` of every image under ``url`` (one listing): samples are
    ``(path inside the filesystem, label)`` in sorted order, sizes in bytes.

    Raises:
        DataError: no images there.
        NotADirectoryError: ``url`` is one object, not a prefix (the caller knows what was
            meant: see ``service.data.shards.shard_prefix``).
    """
    fs, root = get_fs(url)
    root = root.rstrip("/")
    found = with_retries(lambda: fs.find(root, withdirs=False, detail=True),
                         f"listing of {url}", url=url)
    if list(found) == [root]:  # fsspec's find of an object's own path lists that object
        raise NotADirectoryError(f"{url} is one object, not a folder of images")
    relative = sorted(
        (tuple(p[len(root) + 1:].split("/")), int(info.get("size") or 0))
        for p, info in found.items()
        if is_image_name(p.rsplit("/", 1)[-1])
        and not any(part.startswith(".") for part in p[len(root) + 1:].split("/"))
    )
    if not relative:
        raise DataError(f"no images under {url}")
    folders = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=True)
               if e["type"] == "directory"]
    classes, labels = label_by_first_folder([parts for parts, _ in relative], folders)
    samples = [(root + "/" + "/".join(parts), label)
               for (parts, _), label in zip(relative, labels)]
    return samples, classes, [size for _, size in relative]


class RemoteImageFolder(ImageFiles):
    """Every image under ``url``; labelled by first-level folder when all images have one."""

    def __init__(self, url: str, transform: Callable | None = None,
                 size_hint: int | None = None) -> None:
        self.url = url
        samples, classes, _ = list_images(url)
        super().__init__(samples, classes, transform, size_hint)
        self._fs: Any = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}  # one client per process (loader workers fork)

    def open(self, path: str) -> BinaryIO:
        if self._fs is None:
            self._fs = get_fs(self.url)[0]
        return io.BytesIO(self._fs.cat_file(path))


@dataclass(frozen=True)
class Listing:
    """The images of a source to pack, in sorted order, with their labels and sizes."""

    paths: list[str]
    labels: list[int]
    sizes: list[int]
    classes: list[str]
    bad_names: list[dict] = field(default_factory=list)  # left out: see ``list_source``


BAD_NAME = ("the file name is not valid UTF-8 (a pack's plan, report and manifest are UTF-8 "
            "JSON): rename the file, e.g. with `convmv -f latin1 -t utf-8`, to pack it")


def list_source(src: str) -> Listing:
    """Every image under ``src``, sorted, apart from the files whose names (below ``src``)
    are not UTF-8 (``os.listdir`` gives them as str with surrogate escapes): those are
    ``bad_names``, written as ``\\xff`` (one used to end the pack in a UnicodeEncodeError).

    Raises:
        DataError: ``src`` is missing, a file, or holds no images.
    """
    match parse_source(src):
        case FolderSource(path):
            if os.path.isfile(path):
                raise DataError(not_a_pack_source(src))
            try:
                folder = ImageFolder(path)
            except (FileNotFoundError, ValueError) as err:
                raise DataError(f"cannot pack {src}: {err}") from err
            rows = [(p, y, os.path.getsize(p)) for p, y in folder.samples]
            classes, root = folder.classes, path
        case _:
            try:
                samples, classes, sizes = list_images(src)
            except NotADirectoryError:
                raise DataError(not_a_pack_source(src)) from None
            rows = [(p, y, size) for (p, y), size in zip(samples, sizes)]
            root = ""
    good, bad = [], []
    for row in rows:
        (good if _utf8(row[0][len(root):]) else bad).append(row)
    bad_names = [{"path": os.fsencode(p).decode("utf-8", "backslashreplace"), "error": BAD_NAME}
                 for p, _, _ in bad]
    return Listing([p for p, _, _ in good], [y for _, y, _ in good], [n for _, _, n in good],
                   classes, bad_names)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def not_a_pack_source(src: str) -> str:
    """The message for a ``src`` that is one file: a shard of a packed dataset (packed
    already), or anything else (pack reads a folder, not one image)."""
    prefix = shard_prefix(src)
    if prefix is not None:
        return (f"{src} is one shard of the packed dataset {prefix}, which is packed "
                f"already: train on it with data.path={prefix}")
    return (f"{src} is a file, not a folder: pack takes a folder (or URL prefix) of images; "
            "give the folder that holds it")
