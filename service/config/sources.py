"""Where images come from, as a typed value instead of a magic string.

The config keeps the user's spelling (``data.path=procedural``, ``data.path=/imgs``,
``data.path=s3://bucket/imgs``); ``parse_source`` turns it into one of the kinds below, and
the data layer dispatches on the kind. A folder or URL holding a ``manifest.json`` is a
packed dataset; that is looked up when the data is opened (``service.data``), not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROCEDURAL = "procedural"  # the only spelling of the built-in set


@dataclass(frozen=True)
class ProceduralSource:
    """The built-in procedural shapes (``dino_core.data.procedural``); nothing to read."""

    def __str__(self) -> str:
        return PROCEDURAL


@dataclass(frozen=True)
class FolderSource:
    """A local folder of images, any nesting; first-level folders are classes if all are."""

    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class UrlSource:
    """Images under an fsspec URL (``s3://bucket/prefix``, ``gs://...``), one object each."""

    url: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class ShardsSource:
    """A packed dataset (``dino data pack``): WebDataset shards and their manifest, named by
    the manifest's URL or path (``.../manifest.json``) or by the prefix holding it."""

    location: str

    def __str__(self) -> str:
        return self.location


DataSource = ProceduralSource | FolderSource | UrlSource | ShardsSource


def parse_source(text: str) -> DataSource:
    """``procedural``, a local path (``file://`` allowed) or a URL with a scheme."""
    if text == PROCEDURAL:
        return ProceduralSource()
    if text.rstrip("/").endswith("manifest.json"):
        return ShardsSource(text)
    if "://" in text and not text.startswith("file://"):
        return UrlSource(text)
    return FolderSource(text.removeprefix("file://"))


def absolute(text: str) -> str:
    """``text`` with a local path made absolute (Ray workers run in another directory)."""
    source = parse_source(text)
    if isinstance(source, FolderSource):
        return str(Path(source.path).expanduser().resolve())
    if isinstance(source, ShardsSource) and "://" not in text:
        return str(Path(text).expanduser().resolve())
    return text
