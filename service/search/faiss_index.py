"""faiss indexes over unit vectors, inner product: ``IndexFlatIP`` (exact) and
``IndexIVFFlat`` (approximate: each query scans the ``nprobe`` lists whose centroids are
nearest, out of ``nlist``).

faiss is an optional extra (``pip install 'dino-service[search]'``): ``load_faiss`` returns None
without it, and the caller falls back to ``service.search.exact``.
"""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np

from service.errors import MissingExtraError

EXTRA = "pip install 'dino-service[search]'  (faiss-cpu)"
# faiss warns below 39 training points a centroid; 64 a centroid trains well enough for
# coarse lists, and caps the k-means cost at 64 * nlist rows whatever N is
TRAIN_PER_LIST = 64
MIN_PER_LIST = 39
NPROBE = 32  # of nlist ~ 4 sqrt(N) lists: 2.5% of the rows scanned at 100k, 0.8% at 1M
QUERY_CHUNK = 4096  # range_search results of this many queries at a time


def load_faiss() -> ModuleType | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def require_faiss(what: str) -> ModuleType:
    faiss = load_faiss()
    if faiss is None:
        raise MissingExtraError(f"{what} needs faiss, which is not installed: {EXTRA}")
    return faiss


def ivf_lists(n: int) -> int:
    """``nlist``: about 4 sqrt(N) (faiss's guideline is 4-16 sqrt(N)), and no more than N / 39
    so that every list has the training points faiss asks for."""
    return max(1, min(int(4 * math.sqrt(n)), n // MIN_PER_LIST))


class FaissSearch:
    """A faiss index over ``vectors (N, D)`` (float32, unit rows)."""

    name = "faiss"

    def __init__(self, vectors: np.ndarray, kind: str = "flat", seed: int = 0) -> None:
        faiss = require_faiss(f"--index {kind}")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        d = x.shape[1]
        self.kind = kind
        self.exact = kind == "flat"
        if kind == "flat":
            self.index = faiss.IndexFlatIP(d)
        else:
            nlist = ivf_lists(len(x))
            quantizer = faiss.IndexFlatIP(d)
            self.index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(seed).permutation(len(x))[:TRAIN_PER_LIST * nlist]
            self.index.train(x[np.sort(sample)])
            self.index.nprobe = min(NPROBE, nlist)
            self._quantizer = quantizer  # the IVF index does not own it
        self.index.add(x)
        self.vectors = x  # the caller's array (already float32, contiguous): no copy

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As ``TorchExact.search``; an IVF search may return fewer than ``k`` (id -1)."""
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids.astype(np.int64)

    def pairs(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Pairs ``i != j`` of inner product ``> threshold`` (``range_search``), each once or
        twice: an IVF search may find a pair from one side only (the caller dedupes)."""
        x = self.vectors
        out_i, out_j = [], []
        for q0 in range(0, len(x), QUERY_CHUNK):
            lims, _, found = self.index.range_search(x[q0:q0 + QUERY_CHUNK], threshold)
            i = np.repeat(np.arange(q0, q0 + len(lims) - 1), np.diff(lims).astype(np.int64))
            keep = found != i
            out_i.append(i[keep])
            out_j.append(found[keep].astype(np.int64))
        if not out_i:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(out_i), np.concatenate(out_j)

