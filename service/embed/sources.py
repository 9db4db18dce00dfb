"""Which images a job embeds, and under which keys.

A folder or a URL of image files: the key is the path relative to the folder (``cat/1.png``),
the label its class folder's index when every image has one (``ImageFolder``'s rule), else
none. A packed set (``dino data pack``): the key is the member name in its shard
(``000000042.jpg``), the label its ``.cls`` member; the shards are read in the decode tasks,
so the keys are known only there (a job that resumes passes them the keys it has).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dino_core.data.folder import ImageFolder
from service.config.sources import ProceduralSource, absolute, parse_source
from service.data.remote import RemoteImageFolder
from service.data.shards import is_packed, read_manifest
from service.errors import DataError
from service.storage import get_fs, is_local


@dataclass(frozen=True)
class Source:
    """The images of ``--data``.

    Attributes:
        location: ``--data`` as given, made absolute when local.
        root: the folder (local path) or URL the keys are relative to; a packed set's prefix.
        classes: class names (empty: unlabelled).
        items: ``(key, label)`` of each image of a folder or URL, sorted; empty when packed.
        shards: the shard URLs of a packed set; empty otherwise.
        count: images in the source (a packed set: its manifest's count).
    """

    location: str
    root: str
    classes: tuple[str, ...]
    items: tuple[tuple[str, int], ...] = ()
    shards: tuple[str, ...] = ()
    count: int = 0

    @property
    def packed(self) -> bool:
        return bool(self.shards)


def open_source(data: str) -> Source:
    """Lists ``data`` (one listing; a packed set's manifest).

    Raises:
        DataError: no such folder, no images in it, a single file, the procedural set.
    """
    if isinstance(parse_source(data), ProceduralSource):
        raise DataError("--data procedural: write the set to a folder first "
                        "(`dino data --out DIR`), then embed the folder")
    location = absolute(data) if is_local(data) else data
    if is_packed(location):
        m = read_manifest(location)
        if not m.shards:
            raise DataError(f"{data}: a packed set without shards")
        return Source(location, m.prefix, tuple(m.classes),
                      shards=tuple(m.url(s) for s in m.shards), count=m.num_images)
    try:
        if is_local(location):
            root = location.removeprefix("file://")
            if os.path.isfile(root):
                raise DataError(f"--data {data} is a file; give a folder of images, a URL or "
                                "a packed set's prefix")
            found = ImageFolder(root)
            cut = len(os.path.join(root, ""))
        else:
            found = RemoteImageFolder(location)
            cut = len(get_fs(location)[1].rstrip("/")) + 1
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        raise DataError(f"--data {data}: {err}") from None
    items = tuple((path[cut:].replace(os.sep, "/"), label) for path, label in found.samples)
    return Source(location, location.removeprefix("file://"), tuple(found.classes), items,
                  count=len(items))


def key_path(root: str, key: str) -> str:
    """Where the image of ``key`` is: a local path or a URL."""
    return os.path.join(root, key) if is_local(root) else root.rstrip("/") + "/" + key
