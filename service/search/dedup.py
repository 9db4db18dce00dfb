"""``dino dedup``: the pairs of near-duplicates (cosine at or above a threshold) and their
groups, the connected components of the pair graph: a ~ b and b ~ c put a, b and c in one
group, even when a and c are further apart than the threshold."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from service.errors import ConfigError
from service.search.engine import build_engine, pairs_at_least, resolve_index
from service.search.vectors import Embeddings


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    cosine: float
    group: int


@dataclass(frozen=True)
class DedupResult:
    """``groups``: the keys of each group, largest group first (then by first key); a
    pair's ``group`` indexes it."""

    embeddings: str
    threshold: float
    rows: int
    index: str
    engine: str
    exact: bool
    pairs: list[Pair]
    groups: list[list[str]]

    @property
    def grouped_rows(self) -> int:
        return sum(len(g) for g in self.groups)

    def summary(self) -> str:
        removable = self.grouped_rows - len(self.groups)
        how = "exact" if self.exact else "approximate (IVF: a pair may be missed)"
        return (f"dedup: {self.rows} rows, {len(self.pairs)} pairs with cosine >= "
                f"{self.threshold:g}, {len(self.groups)} groups holding {self.grouped_rows} "
                f"rows ({removable} removable keeping one a group); {self.index} index, "
                f"{self.engine}, {how}")

    def to_json(self) -> dict[str, Any]:
        return {"embeddings": self.embeddings, "threshold": self.threshold, "rows": self.rows,
                "index": self.index, "engine": self.engine, "exact": self.exact,
                "pairs": [{"a": p.a, "b": p.b, "cosine": p.cosine, "group": p.group}
                          for p in self.pairs],
                "groups": self.groups}

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["a", "b", "cosine", "group"])
        w.writerows([p.a, p.b, f"{p.cosine:.6f}", p.group] for p in self.pairs)
        return buf.getvalue()


def components(i: list[int], j: list[int]) -> dict[int, int]:
    """The component of each node of the edges ``i[p] - j[p]``, named by its smallest node
    (union-find with path halving; nodes without an edge are not in it)."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i, j):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: root(x) for x in list(parent)}


def find_duplicates(emb: Embeddings, threshold: float, index: str = "flat") -> DedupResult:
    """Every pair of ``emb``'s rows with cosine ``>= threshold``, each once, and the groups.

    Raises:
        ConfigError: a threshold outside (-1, 1] or an unknown ``index``.
        MissingExtraError: ``ivf`` without faiss.
    """
    if not -1 < threshold <= 1:
        raise ConfigError(f"--threshold must be in (-1, 1], got {threshold:g}")
    n = len(emb.keys)
    kind = resolve_index(index, n, n)
    engine = build_engine(emb.vectors, kind)
    i, j, scores = pairs_at_least(engine, emb.vectors, threshold)
    comp = components(i.tolist(), j.tolist())
    members: dict[int, list[int]] = {}
    for row in sorted(comp):
        members.setdefault(comp[row], []).append(row)
    ordered = sorted(members.values(), key=lambda rows: (-len(rows), rows[0]))
    group_of = {rows[0]: g for g, rows in enumerate(ordered)}  # a group's root: its first row
    pairs = [Pair(emb.keys[a], emb.keys[b], s, group_of[comp[a]])
             for a, b, s in zip(i.tolist(), j.tolist(), scores.tolist())]
    groups = [[emb.keys[r] for r in rows] for rows in ordered]
    return DedupResult(emb.out, threshold, n, kind, engine.name, engine.exact, pairs, groups)

