"""``embed``: the embeddings of a folder, a URL or a packed set, written as Parquet parts and
a manifest (``service.embed``); called again on an unfinished ``out`` it resumes, with
``incremental`` it adds the images that are new."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from service.embed import EmbedResult
from service.errors import ConfigError

Say = Callable[[str], None]


class EmbedInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job; its text says what is kept and how to go on."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def embed(checkpoint: str, data: str, out: str, *, features: str = "cls",
          weights: str = "teacher", image_size: int | None = None, batch_size: int = 64,
          actors: int = 1, gpus: bool = False, cpus_per_actor: int = 1,
          part_rows: int | None = None, incremental: bool = False, address: str | None = None,
          num_cpus: int | None = None, verbose: bool = False, say: Say = _stderr) -> EmbedResult:
    """Embeds ``data`` with ``checkpoint``'s backbone into ``out``; decoding in Ray Data
    tasks, the backbone in ``actors`` actors, on the cluster at ``address`` (else
    RAY_ADDRESS, else a local Ray of ``num_cpus``). Bad input raises before Ray starts."""
    from service.embed import check_inputs, run_embed
    from service.embed.job import patch_bytes
    from service.embed.pipeline import Resources

    for name, value in (("batch_size", batch_size), ("actors", actors),
                        ("cpus_per_actor", cpus_per_actor)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    checked = check_inputs(checkpoint, data, out, features, weights, image_size, incremental,
                           part_rows)
    plan, spec = checked.plan, checked.spec
    what = {"fresh": "embedding", "resume": "resuming", "incremental": "adding new images to"}
    say(f"[dino] embed: {what[plan.mode]} {out}: {plan.total} images to embed"
        + (f" ({len(plan.done)} already in {len(plan.manifest['parts'])} parts)"
           if plan.done else "")
        + f"; {spec.features}, dim {spec.dim}, side {spec.image_size}")
    if spec.features == "patch":
        say(f"[dino] embed: patch grids take {plan.total} x {spec.tokens} tokens x {spec.dim} "
            f"x 2 bytes = {size_text(patch_bytes(checked))}")
    if plan.total:
        start_ray(address, num_cpus, actors * cpus_per_actor + 1, verbose, say)
    try:
        return run_embed(checked, out, Resources(actors, gpus, cpus_per_actor, batch_size),
                         say, verbose)
    except KeyboardInterrupt as err:
        raise EmbedInterrupted(
            f"interrupted: {plan.manifest['count']} images are in "
            f"{len(plan.manifest['parts'])} parts under {out}; run the same command again "
            "to embed the rest") from err


def start_ray(address: str | None, num_cpus: int | None, need: int, verbose: bool,
              say: Say) -> None:
    """The cluster at ``address`` (else RAY_ADDRESS, read as ``dino train`` reads it), or a
    local Ray of this machine's CPUs (``num_cpus``), with at least ``need`` (the actors' and
    one for the decode tasks, which otherwise never run). Ray's own start-up lines only with
    ``verbose``. A Ray this process already joined is used as it is."""
    import ray

    from service.config import load_config
    from service.train.driver import quiet_ray_driver

    if ray.is_initialized():
        return
    cfg = load_config(overrides=[f"ray.address={address}"] if address else [])
    if not verbose:
        quiet_ray_driver()
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, configure_logging=False, log_to_driver=True)
        return
    cpus = num_cpus or os.cpu_count() or 1
    if cpus < need:
        say(f"[dino] embed: the local Ray gets {need} logical CPUs ({cpus} asked): the "
            "actors' and one for decoding")
    ray.init(address="local", num_cpus=max(cpus, need), include_dashboard=False,
             configure_logging=False, log_to_driver=True)


def size_text(n: float) -> str:
    """``1.5 GB``: decimal units, as disks are sold."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"
