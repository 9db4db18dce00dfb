"""``dino neighbours`` and ``dino dedup``: cosine search over the vectors ``dino embed`` wrote.

One concept a module: ``manifest`` (the embeddings folder's manifest, checked), ``vectors``
(its parts read into unit vectors), ``exact`` (the blocked torch search), ``faiss_index``
(faiss's flat and IVF indexes, an optional extra), ``engine`` (which of them, and the one way
results are scored and ordered), ``neighbours`` (a query's nearest rows), ``dedup``
(near-duplicate pairs and groups), ``grid`` (the PNG of a query's neighbours). Image files
and outputs, local or URL, are read and written through ``service.storage``.
"""

from service.search.dedup import DedupResult, find_duplicates
from service.search.neighbours import NeighboursResult, find_neighbours, grid_tiles
from service.search.vectors import Embeddings, load_embeddings

__all__ = ["DedupResult", "Embeddings", "NeighboursResult", "find_duplicates",
           "find_neighbours", "grid_tiles", "load_embeddings"]
