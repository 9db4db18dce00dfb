"""Images under an fsspec URL (``s3://bucket/prefix``, ``gs://...``), one object each: the
same dataset as ``dino_core``'s local ``ImageFolder`` (same attributes, same labelling of
empty class folders, same skipping of unreadable files), read through fsspec."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, BinaryIO

from dino_core.data.folder import ImageFiles, is_image_name, label_by_first_folder
from service.errors import DataError
from service.storage import get_fs, with_retries


def list_images(url: str) -> tuple[list[tuple[str, int]], list[str], list[int]]:
    """``(samples, classes, sizes)`` of every image under ``url`` (one listing): samples are
    ``(path inside the filesystem, label)`` in sorted order, sizes in bytes.

    Raises:
        DataError: no images there.
    """
    fs, root = get_fs(url)
    root = root.rstrip("/")
    found = with_retries(lambda: fs.find(root, withdirs=False, detail=True),
                         f"listing of {url}", url=url)
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
