"""The Ray Data pipeline of a job: listing rows (a folder's keys, or a packed set's shards),
decoded and cropped by CPU tasks (``map_batches`` with a function, ``service.embed.decode``),
embedded by an actor pool (``map_batches`` with ``Embedder``: the backbone loaded once per
actor), streamed back to the driver, which writes the parts.

Ray Data's order of output is its own (``preserve_order`` off): rows are keyed, so no order
is needed, and a slow block does not hold the others up. A decode task's output is one
batch of the actors' (``batch_size`` rows): Ray Data then hands it over as it is instead of
cutting and joining blocks (bench/embed.py: steady state 265 -> 294 images/s on 2 cores, 32
-> 64 rows).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from service.embed.decode import decode_files, decode_shards
from service.embed.features import embed_batch
from service.embed.sources import Source
from service.embed.spec import EmbedSpec, split_transform
from service.models.backbones import load_backbone

DECODE_MEMORY = 256 * 2**20  # bytes a decode task asks for


@dataclass(frozen=True)
class Resources:
    """Attributes:
        actors: actors of the backbone's pool.
        gpus: one GPU to each actor.
        cpus_per_actor: CPUs each actor holds (and torch threads it runs).
        batch_size: images per forward.
    """

    actors: int = 1
    gpus: bool = False
    cpus_per_actor: float = 1.0
    batch_size: int = 64


class Embedder:
    """The actor of the pool: the backbone on its device; a batch of crops in, the vectors
    out (``{"key", "label", "embedding" (B, values), "error"}``; a row with an error keeps
    zeros)."""

    def __init__(self, spec: EmbedSpec, gpus: bool, threads: int) -> None:
        torch.set_num_threads(max(threads, 1))
        self.device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
        model, _ = load_backbone(spec.checkpoint, spec.weights)  # seeded when random
        self.model: nn.Module = model.to(self.device).eval()
        self.spec, self.tail = spec, split_transform(spec.image_size)[1]
        self.dtype = np.float16 if spec.dtype == "float16" else np.float32

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        out = np.zeros((len(ok), self.spec.row_values), self.dtype)
        if ok.any():
            # uint8 to the device, scaled there: a quarter of the bytes of float32
            x = self.tail(torch.from_numpy(batch["image"][ok]).to(self.device))
            vectors = embed_batch(self.model, x, self.spec.features).flatten(1)
            out[ok] = vectors.cpu().numpy().astype(self.dtype)
        return {"key": batch["key"], "label": batch["label"], "embedding": out,
                "error": batch["error"]}


def build_dataset(source: Source, todo: list[tuple[str, int]], done: set[str],
                  spec: EmbedSpec, res: Resources):
    """The job's ``ray.data.Dataset`` (lazy): rows ``{"key", "label", "embedding",
    "error"}``. Each actor reads the checkpoint itself (``load_backbone``): on a cluster of
    several machines a local checkpoint, like a local folder of images, must be on a shared
    filesystem, or be a URL."""
    import ray
    import ray.data

    side, batch = spec.image_size, res.batch_size
    # Ray Data fuses a task map into the actor map after it when their remote arguments
    # agree, which would decode in the actors; the decode's own memory request keeps them
    # apart (and it is true: a 6000 x 4000 photo decodes to 72 MB, a batch of crops is more)
    decode_args = {"num_cpus": 1, "memory": DECODE_MEMORY}
    if source.packed:
        rows = [{"shard": url} for url in source.shards]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(decode_shards, batch_size=1, batch_format="numpy",
                            fn_kwargs={"side": side, "done": ray.put(frozenset(done)),
                                       "rows": batch},
                            **decode_args)
    else:
        rows = [{"key": k, "label": y} for k, y in todo]
        blocks = max(1, min(-(-len(rows) // batch), 1000))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.map_batches(decode_files, batch_size=batch, batch_format="numpy",
                            fn_kwargs={"root": source.root, "side": side, "rows": batch},
                            **decode_args)
    return ds.map_batches(
        Embedder, batch_size=batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res.actors),
        num_gpus=1 if res.gpus else 0, num_cpus=res.cpus_per_actor,
        fn_constructor_kwargs={"spec": spec, "gpus": res.gpus,
                               "threads": int(res.cpus_per_actor)})


def stream(ds) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's output blocks, as they finish."""
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


def configure_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars and INFO lines only with ``-v`` (our progress line says as
    much)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        # said of a small job whose blocks are fewer than the actors; nothing to act on
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
