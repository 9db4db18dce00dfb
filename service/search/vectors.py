"""The rows of an embeddings folder in memory: keys, labels and unit vectors.

The parts are read whole (a row of ``dim`` float32 is 1.5 kB at 384: a million rows are 1.5 GB)
and every vector is l2-normalised here, so that an inner product is the cosine whatever the
features (``cls`` rows are already unit vectors; ``cls+mean`` too; a vector of zeros stays
zeros, with cosine 0 to everything).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from service.errors import DataError, StorageError
from service.search.manifest import Manifest, check_searchable, read_manifest
from service.storage import join, read_bytes

COLUMNS = ["key", "label", "embedding"]


@dataclass(frozen=True)
class Embeddings:
    """An embeddings folder, read.

    Attributes:
        out: the folder or URL.
        manifest: its checked manifest; ``raw``: the document as written.
        keys: ``(N,)`` the image keys (paths relative to ``manifest.data``).
        labels: ``(N,)`` int64 class index, -1 where none.
        vectors: ``(N, dim)`` float32, C-contiguous, rows of unit length (or zero).
    """

    out: str
    manifest: Manifest
    raw: dict
    keys: list[str]
    labels: np.ndarray
    vectors: np.ndarray

    def index_of(self, key: str) -> int | None:
        """The row of ``key``, or None."""
        try:
            return self.keys.index(key)
        except ValueError:
            return None

    def class_name(self, label: int) -> str | None:
        classes = self.manifest.classes
        return classes[label] if 0 <= label < len(classes) else None


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x (N, D)`` scaled to unit length, float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.float32(1e-12)))


def load_embeddings(out: str) -> Embeddings:
    """Reads the manifest and every part of ``out`` (a local folder or a URL).

    Raises:
        DataError: a refused manifest (``read_manifest``), patch features, or a part that is
            missing or disagrees with the manifest (rows, width, columns), named.
    """
    manifest, raw = read_manifest(out)
    check_searchable(manifest, out)
    keys: list[str] = []
    labels, vectors = [], []
    for part in manifest.parts:
        table = _read_part(out, part.file)
        if table.num_rows != part.rows:
            raise DataError(f"{join(out, part.file)}: {table.num_rows} rows, the manifest "
                            f"says {part.rows}")
        keys.extend(str(k) for k in table.column("key").to_pylist())
        labels.append(table.column("label").fill_null(-1).to_numpy().astype(np.int64))
        vectors.append(_matrix(table.column("embedding"), manifest.dim, join(out, part.file)))
    return Embeddings(out, manifest, raw, keys, np.concatenate(labels),
                      normalise(np.concatenate(vectors)))


def _read_part(out: str, name: str) -> pa.Table:
    url = join(out, name)
    gone = DataError(f"{url}: listed in the manifest but missing")
    try:
        blob = read_bytes(url)
    except FileNotFoundError:
        raise gone from None
    except StorageError as err:  # an object store's not-found comes wrapped
        if isinstance(err.__cause__, FileNotFoundError):
            raise gone from None
        raise
    try:
        table = pq.read_table(io.BytesIO(blob))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{url} is not a readable Parquet file: {err}") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{url}: no column {', '.join(missing)} (a `dino embed` part has "
                        f"{', '.join(COLUMNS)})")
    return table


def _matrix(column: pa.ChunkedArray, dim: int, url: str) -> np.ndarray:
    """A ``list<float>`` column as ``(rows, dim)`` float32."""
    column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        raise DataError(f"{url}: embedding is {column.type}, not a list of floats")
    widths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or (widths != dim).any():
        raise DataError(f"{url}: an embedding is not of {dim} values (the manifest's dim)")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(len(column), dim)
