"""Exact inner-product search in torch, in blocks: the engine when faiss is not installed.

Neither the top-k search nor the all-pairs scan ever holds more than one
``(query_chunk, row_chunk)`` block of scores: a block's top-k is merged into the running
top-k of its queries, and a block's pairs above the threshold are kept as index arrays.
"""

from __future__ import annotations

import numpy as np
import torch

QUERY_CHUNK = 1024
ROW_CHUNK = 8192  # a 1024 x 8192 block of float32 scores is 32 MB


class TorchExact:
    """Exact search over the rows of ``vectors (N, D)`` (float32, unit rows)."""

    name = "torch"
    exact = True

    def __init__(self, vectors: np.ndarray, query_chunk: int = QUERY_CHUNK,
                 row_chunk: int = ROW_CHUNK) -> None:
        self.rows = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self.query_chunk, self.row_chunk = query_chunk, row_chunk

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows of largest inner product with each query.

        Args:
            queries: ``(M, D)`` float32.
            k: at most ``N``.

        Returns:
            scores ``(M, k)`` float32 and row indices ``(M, k)`` int64, best first.
        """
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        scores, ids = [], []
        for q in q_all.split(self.query_chunk):
            best_s = torch.full((len(q), 0), -torch.inf)
            best_i = torch.zeros((len(q), 0), dtype=torch.int64)
            for start in range(0, len(self.rows), self.row_chunk):
                block = q @ self.rows[start:start + self.row_chunk].T  # (m, c)
                top = block.topk(min(k, block.shape[1]), dim=1)
                best_s = torch.cat([best_s, top.values], dim=1)
                best_i = torch.cat([best_i, top.indices + start], dim=1)
                if best_s.shape[1] > k:  # merged: the running top-k of these queries
                    keep = best_s.topk(k, dim=1)
                    best_s, best_i = keep.values, best_i.gather(1, keep.indices)
            scores.append(best_s)
            ids.append(best_i)
        return torch.cat(scores).numpy(), torch.cat(ids).numpy()

    @torch.no_grad()
    def pairs(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Every pair ``i < j`` of rows with inner product ``> threshold``.

        Returns:
            ``(P,)`` int64 arrays ``i`` and ``j``; only blocks on or above the diagonal are
            computed.
        """
        out_i, out_j = [], []
        n = len(self.rows)
        for q0 in range(0, n, self.query_chunk):
            q = self.rows[q0:q0 + self.query_chunk]
            for r0 in range(q0, n, self.row_chunk):  # rows before q0 were paired already
                block = q @ self.rows[r0:r0 + self.row_chunk].T
                qi = torch.arange(q0, q0 + len(q)).unsqueeze(1)
                rj = torch.arange(r0, r0 + block.shape[1]).unsqueeze(0)
                a, b = torch.nonzero((block > threshold) & (rj > qi), as_tuple=True)
                out_i.append(a + q0)
                out_j.append(b + r0)
        if not out_i:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return torch.cat(out_i).numpy(), torch.cat(out_j).numpy()
