"""Which engine searches (``--index``), and the one way results are scored and ordered.

Engines: faiss (``service.search.faiss_index``) when installed, else the blocked torch search
(``service.search.exact``). An engine only proposes candidates: the cosine that is printed,
compared with the threshold and sorted on is recomputed here in float64 from the unit
vectors, one row at a time, and ties are broken by row index. So the flat faiss index and
the torch search give the same neighbours, the same pairs and the same digits, whatever
their own float32 rounding (its error, about ``D * 2^-24``, is far below ``MARGIN``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from service.errors import ConfigError
from service.search.exact import TorchExact
from service.search.faiss_index import FaissSearch, load_faiss

INDEXES = ("flat", "ivf", "auto")
# `auto` picks IVF above this many query x row products. Exact search reads every row for
# every query; an IVF index is built for the command and thrown away (its k-means costs about
# 64 * nlist * nlist * D * 10 multiply-adds), so it can only pay off when the queries are
# many. One query (`dino neighbours`) is always exact: 10^10 rows would not fit in memory
# anyway. `dino dedup` (N queries) turns approximate above 100,000 rows: there the exact scan is
# 10^10 * D multiply-adds (3.8e12 at D = 384, minutes on a few cores at tens of GFLOP/s;
# estimated, not measured), IVF's scan with nprobe 32 of 1,264 lists 1/40 of it plus a
# k-means of about 4e11; below, the exact scan takes seconds to a minute, and misses nothing.
AUTO_IVF_WORK = 10**10
MARGIN = 1e-3  # candidates are taken this far below the threshold, then rescored exactly
EXTRA_CANDIDATES = 8  # top-k fetches k + this, so that rescoring decides the k-th place
RESCORE_CHUNK = 65536  # pairs rescored at a time: 65536 x 384 x 8 bytes is 200 MB


class Engine(Protocol):
    name: str  # "faiss" or "torch"
    exact: bool

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def pairs(self, threshold: float) -> tuple[np.ndarray, np.ndarray]: ...


def resolve_index(kind: str, n_queries: int, n_rows: int) -> str:
    """``flat`` or ``ivf`` for ``--index kind``; ``auto``: see ``AUTO_IVF_WORK``.

    Raises:
        ConfigError: an unknown kind.
    """
    if kind not in INDEXES:
        raise ConfigError(f"--index must be one of {', '.join(INDEXES)}, got {kind!r}")
    if kind != "auto":
        return kind
    big = n_queries * n_rows > AUTO_IVF_WORK
    return "ivf" if big and load_faiss() is not None else "flat"


def build_engine(vectors: np.ndarray, kind: str) -> Engine:
    """An engine over ``vectors (N, D)`` for a resolved ``kind``: flat is faiss's
    ``IndexFlatIP`` when faiss is installed, else the torch search; ivf needs faiss.

    Raises:
        MissingExtraError: ``ivf`` without faiss, naming the extra.
    """
    if kind == "flat" and load_faiss() is None:
        return TorchExact(vectors)
    return FaissSearch(vectors, kind)


def cosines(vectors: np.ndarray, rows: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``vectors[rows[p]] . vectors[other[p]]`` for each p (``other`` an index array), or
    ``vectors[rows[p]] . other`` (``other`` one vector ``(D,)``): float64, row by row, so a
    pair has the same value whichever engine found it and whatever pairs came with it."""
    one = other.astype(np.float64) if other.dtype.kind == "f" else None
    out = np.empty(len(rows), np.float64)
    for s in range(0, len(rows), RESCORE_CHUNK):
        a = vectors[rows[s:s + RESCORE_CHUNK]].astype(np.float64)
        b = one if one is not None else vectors[other[s:s + RESCORE_CHUNK]].astype(np.float64)
        out[s:s + RESCORE_CHUNK] = (a * b).sum(axis=1)
    return out


def top_k(engine: Engine, vectors: np.ndarray, query: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows nearest to ``query (D,)`` (a unit vector): ``(ids, cosines)``, best
    first, ties by row."""
    fetch = min(len(vectors), k + EXTRA_CANDIDATES)
    _, ids = engine.search(query[None, :].astype(np.float32), fetch)
    ids = ids[0][ids[0] >= 0]  # an IVF search may find fewer
    scores = cosines(vectors, ids, query)
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


def pairs_at_least(engine: Engine, vectors: np.ndarray, threshold: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows with cosine ``>= threshold``, each once: ``(i, j, cosine)`` with
    ``i < j``, highest cosine first, then by ``i``, ``j``."""
    i, j = engine.pairs(threshold - MARGIN)
    a, b = np.minimum(i, j), np.maximum(i, j)
    pair = np.unique(a * len(vectors) + b)  # an approximate engine may find a pair twice
    a, b = pair // len(vectors), pair % len(vectors)
    scores = cosines(vectors, a, b)
    keep = scores >= threshold
    a, b, scores = a[keep], b[keep], scores[keep]
    order = np.lexsort((b, a, -scores))
    return a[order], b[order], scores[order]
