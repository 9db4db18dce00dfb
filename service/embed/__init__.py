"""``dino embed``: the embeddings of a data set (a folder, a URL or a packed set) by a frozen
backbone, computed by a Ray Data pipeline (decode and preprocessing in CPU tasks, the backbone
in an actor pool) and written as Parquet parts with a manifest, resumable part by part.

One concept a module: ``spec`` (what is computed: features, side, preprocessing, the same as
the evaluations'), ``features`` (the forward), ``sources`` (which images, under which keys),
``decode`` (the CPU tasks), ``output`` (parts and manifest), ``plan`` (fresh, resumed or
incremental), ``pipeline`` (the Ray Data job), ``job`` (all of it), ``compute`` (the same
vectors in process, for a few files)."""

from service.embed.compute import embed_files
from service.embed.job import EmbedResult, check_inputs, run_embed
from service.embed.spec import FEATURES, EmbedSpec

__all__ = ["FEATURES", "EmbedResult", "EmbedSpec", "check_inputs", "embed_files", "run_embed"]
