"""``dino neighbours``: the rows nearest to a query, by cosine.

The query is a key of the embeddings (its own row, which is then its own first neighbour),
else an image file outside them, embedded here with the manifest's checkpoint and
preprocessing (``service.embed.compute.embed_files``: the vectors the job computed).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from service.errors import ConfigError, DataError
from service.search.engine import build_engine, resolve_index, top_k
from service.search.grid import Tile
from service.search.vectors import Embeddings, normalise
from service.storage import exists, is_local, join


@dataclass(frozen=True)
class Query:
    """What was asked: ``kind`` ``key`` (a row) or ``image`` (a file, embedded here);
    ``location``: where its image is (the key under the manifest's ``data``, or the file)."""

    text: str
    kind: str
    vector: np.ndarray
    location: str


@dataclass(frozen=True)
class Neighbour:
    rank: int
    key: str
    label: int | None
    class_name: str | None
    cosine: float


@dataclass(frozen=True)
class NeighboursResult:
    embeddings: str
    query: Query
    index: str  # flat or ivf
    engine: str  # faiss or torch
    neighbours: list[Neighbour]

    def to_json(self) -> dict[str, Any]:
        return {"embeddings": self.embeddings,
                "query": {"text": self.query.text, "kind": self.query.kind,
                          "location": self.query.location},
                "index": self.index, "engine": self.engine, "k": len(self.neighbours),
                "neighbours": [asdict(n) for n in self.neighbours]}


def image_location(emb: Embeddings, key: str) -> str:
    """Where the image of ``key`` was read from: the manifest's ``data`` root and the key (a
    packed set's keys name members of its shards: not a file there)."""
    return join(emb.manifest.data, key)


def resolve_query(emb: Embeddings, text: str) -> Query:
    """A key of ``emb`` (first), else an image file (local or a URL), embedded.

    Raises:
        DataError: neither a key nor an image file; the image cannot be read or decoded.
    """
    row = emb.index_of(text)
    if row is not None:
        return Query(text, "key", emb.vectors[row], image_location(emb, text))
    is_file = os.path.isfile(text.removeprefix("file://")) if is_local(text) else exists(text)
    if not is_file:
        sample = ", ".join(repr(k) for k in emb.keys[:3])
        raise DataError(f"--query {text!r} is neither a key of {emb.out} ({len(emb.keys)} keys, "
                        f"e.g. {sample}) nor an image file")
    from service.embed.compute import embed_files  # torch and the backbone: only for images

    vectors = np.asarray(embed_files(emb.raw, [text]), dtype=np.float32)
    if vectors.shape != (1, emb.manifest.dim):
        raise DataError(f"--query {text}: embedded to shape {vectors.shape}, the embeddings "
                        f"have dim {emb.manifest.dim}")
    return Query(text, "image", normalise(vectors)[0], text)


def find_neighbours(emb: Embeddings, query: str, k: int, index: str = "flat"
                    ) -> NeighboursResult:
    """The ``k`` rows of ``emb`` nearest to ``query`` (a key or an image file), best first.

    Raises:
        ConfigError: ``k`` below 1 or an unknown ``index``.
        MissingExtraError: ``ivf`` without faiss.
        DataError: see ``resolve_query``.
    """
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}")
    kind = resolve_index(index, 1, len(emb.keys))
    q = resolve_query(emb, query)
    engine = build_engine(emb.vectors, kind)
    ids, scores = top_k(engine, emb.vectors, q.vector, min(k, len(emb.keys)))
    found = []
    for rank, (row, score) in enumerate(zip(ids.tolist(), scores.tolist()), start=1):
        label = int(emb.labels[row])
        found.append(Neighbour(rank, emb.keys[row], label if label >= 0 else None,
                               emb.class_name(label), score))
    return NeighboursResult(emb.out, q, kind, engine.name, found)


def grid_tiles(emb: Embeddings, result: NeighboursResult) -> list[Tile]:
    """The query's tile, then one a neighbour (``service.search.grid``)."""
    q = result.query
    return [Tile(q.location, "query", q.text if q.kind == "key" else os.path.basename(q.text)),
            *(Tile(image_location(emb, n.key), f"{n.rank}. cos {n.cosine:.4f}", n.key)
              for n in result.neighbours)]
