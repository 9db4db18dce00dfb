"""The manifest of a ``dino embed`` folder, checked before any part is read.

Exactly the fields ``service.embed.output`` writes, each with its type: a field missing, of
another type, or not written by ``dino embed`` refuses the folder, naming the field. A part's
file name must be one the job writes (``part-00000.parquet``): a forged manifest cannot point
the reader outside the folder.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic import ValidationError as _Invalid

from service.errors import DataError
from service.storage import get_fs, join, read_bytes, with_retries

MANIFEST = "manifest.json"
PART_FILE = r"^part-\d{5,}\.parquet$"
SEARCHABLE = ("cls", "cls+mean")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Part(_Strict):
    file: str = Field(pattern=PART_FILE)
    rows: StrictInt = Field(ge=0)


class Skipped(_Strict):
    key: StrictStr
    error: StrictStr


class Manifest(_Strict):
    """``manifest.json`` of an embeddings folder, as ``dino embed`` writes it."""

    format: Literal[1]
    complete: StrictBool
    count: StrictInt = Field(ge=0)
    dim: StrictInt = Field(ge=1)
    features: Literal["cls", "cls+mean", "patch"]
    dtype: Literal["float32", "float16"]
    checkpoint: StrictStr
    data: StrictStr
    image_size: StrictInt = Field(ge=1)
    settings: dict[str, Any]
    parts: list[Part]
    skipped: list[Skipped]

    @property
    def classes(self) -> list[str]:
        """The class names labels index (empty: unlabelled)."""
        names = self.settings.get("classes")
        return [str(c) for c in names] if isinstance(names, list) else []


def read_manifest(out: str) -> tuple[Manifest, dict[str, Any]]:
    """The checked manifest under ``out`` and its raw document (what ``embed_files`` takes).

    Raises:
        DataError: no manifest, not JSON, a field missing, mistyped or extra (named), counts
            that disagree, or an unfinished job.
    """
    url = join(out, MANIFEST)
    fs, path = get_fs(url)
    if not with_retries(lambda: fs.exists(path), f"lookup of {url}", url=out):
        raise DataError(f"--embeddings {out}: no {MANIFEST} there; give the --out folder of "
                        "a `dino embed` run")
    raw = read_bytes(url, fs)
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise DataError(f"{url} is not readable JSON: {err}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{url}: refused: not a `dino embed` manifest (a JSON object expected)")
    try:
        m = Manifest.model_validate(doc)
    except _Invalid as err:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                           for e in err.errors()[:5])
        raise DataError(f"{url}: refused: not a `dino embed` manifest ({fields})") from None
    _check_consistent(m, url)
    return m, doc


def _check_consistent(m: Manifest, url: str) -> None:
    files = [p.file for p in m.parts]
    if len(set(files)) != len(files):
        raise DataError(f"{url}: refused: parts: a file is listed twice")
    if sum(p.rows for p in m.parts) != m.count:
        raise DataError(f"{url}: refused: count: {m.count} but the parts hold "
                        f"{sum(p.rows for p in m.parts)} rows")
    if not m.complete:
        raise DataError(f"{url}: complete: false: the `dino embed` job has not finished; "
                        "rerun the same command to finish it")
    if m.count == 0:
        raise DataError(f"{url}: count: 0: no embeddings to search")


def check_searchable(m: Manifest, out: str) -> None:
    """Patch grids are one vector per patch, not per image: no cosine between images.

    Raises:
        DataError: ``features`` is ``patch``, naming the setting that makes searchable ones.
    """
    if m.features not in SEARCHABLE:
        raise DataError(f"{out} holds features={m.features!r} (a grid of patch tokens per "
                        "image), which are not searchable; embed with `dino embed --features "
                        "cls` (or cls+mean) to search")
