"""What a job writes under ``--out`` (a local folder or an object-storage URL):

- ``part-00000.parquet``, ...: columns ``key`` (string), ``label`` (int64, null when the
  source has no classes) and ``embedding`` (``list<float32>``; ``patch``: ``list<float16>``,
  the grid flattened row-major, its shape in the manifest's ``settings.grid``). A part is
  written under a temporary name and then moved (local) or put in one request (object
  storage), so a part that exists is complete.
- ``manifest.json``: ``{"format": 1, "complete", "count", "dim", "features", "dtype",
  "checkpoint", "data", "image_size", "settings", "parts": [{"file", "rows"}], "skipped":
  [{"key", "error"}]}``, rewritten after every part; ``complete`` turns true at the end.

The parts themselves, not the manifest, say what is done: a job killed between a part and
its manifest update resumes from the part.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.embed.spec import EmbedSpec
from service.errors import DataError
from service.storage import (
    get_fs,
    is_local,
    join,
    makedirs,
    read_bytes,
    replace_file,
    upload_file,
    with_retries,
    write_bytes,
)

MANIFEST, FORMAT = "manifest.json", 1
PART = re.compile(r"^part-(\d{5,})\.parquet$")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def new_manifest(spec: EmbedSpec, data: str) -> dict[str, Any]:
    return {"format": FORMAT, "complete": False, "count": 0, "dim": spec.dim,
            "features": spec.features, "dtype": spec.dtype, "checkpoint": spec.checkpoint,
            "data": data, "image_size": spec.image_size, "settings": spec.settings(),
            "parts": [], "skipped": []}


def read_manifest(out: str) -> dict[str, Any] | None:
    """The manifest under ``out``, or None if there is none."""
    fs, path = get_fs(join(out, MANIFEST))
    if not with_retries(lambda: fs.exists(path), f"lookup of {path}", url=out):
        return None
    raw = read_bytes(join(out, MANIFEST), fs)
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise DataError(f"{join(out, MANIFEST)} is not readable JSON: {err}") from None
    if doc.get("format") != FORMAT:
        raise DataError(f"{join(out, MANIFEST)} is not a `dino embed` manifest "
                        f"(format={doc.get('format')!r})")
    return doc


def write_manifest(out: str, manifest: dict[str, Any]) -> None:
    body = json.dumps(manifest, indent=1).encode()
    if is_local(out):
        makedirs(out)
        replace_file(join(out, MANIFEST), lambda f: f.write(body))  # never seen half written
        return
    write_bytes(join(out, MANIFEST), body)  # an object appears whole


def list_parts(out: str) -> list[str]:
    """The part files under ``out``, in order (temporary files left by a kill are not)."""
    fs, path = get_fs(out)
    if not with_retries(lambda: fs.exists(path), f"lookup of {path}", url=out):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1]
             for p in with_retries(lambda: fs.ls(path, detail=False), f"listing of {out}",
                                   url=out)]
    return sorted((n for n in names if PART.match(n)), key=lambda n: int(PART.match(n)[1]))


def next_index(parts: list[str]) -> int:
    return max((int(PART.match(n)[1]) for n in parts), default=-1) + 1  # type: ignore[index]


def read_part(out: str, name: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(join(out, name))), columns=columns)


def part_table(keys: list[str], labels: list[int], embeddings: np.ndarray) -> pa.Table:
    """The rows of one part; ``embeddings`` ``(n, values)`` float32 or float16."""
    n = len(keys)
    flat = np.ascontiguousarray(embeddings).reshape(-1)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * (flat.size // max(n, 1)))
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "label": pa.array([None if y < 0 else int(y) for y in labels], pa.int64()),
        "embedding": pa.ListArray.from_arrays(offsets, pa.array(flat)),
    })


def write_part(out: str, name: str, table: pa.Table) -> None:
    """Writes a part so that it exists only when complete."""
    if is_local(out):
        makedirs(out)
        replace_file(join(out, name), lambda f: pq.write_table(table, f))
        return
    with tempfile.TemporaryDirectory(prefix="dino-embed-") as d:
        local = os.path.join(d, name)
        pq.write_table(table, local)
        upload_file(local, join(out, name))

