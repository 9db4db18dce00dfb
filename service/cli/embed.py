"""``dino embed``: the embeddings of a folder, a URL or a packed set, written as Parquet
parts and a manifest (``service.embed``); a rerun resumes, ``--incremental`` adds new
images."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.cli.common import flush_ray_logs, positive_int, weights_arg

if TYPE_CHECKING:
    from service.embed.job import Checked

EXIT_SIGINT = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="embed the images of a folder, URL or packed set into Parquet files",
        epilog="The vectors are the evaluations' (dino eval knn: the same crop, side and "
               "normalisation). Rerunning the same command on an interrupted --out embeds "
               "only what no part holds; --incremental adds the images that are new.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir/URL, run folder/URL or backbone file")
    weights_arg(p)
    p.add_argument("--data", required=True,
                   help="folder or URL of images (class folders give labels) or a packed set")
    p.add_argument("--out", required=True, help="folder or URL for the parts and manifest")
    # checked by the job, not by argparse: a bad value is one `dino: ...` line
    p.add_argument("--features", default="cls", metavar="cls|cls+mean|patch",
                   help="cls (default): the l2-normalised CLS feature, as k-NN's; cls+mean: "
                        "with the mean patch token; patch: the patch grid, in float16")
    p.add_argument("--image-size", type=positive_int,
                   help="centre-crop side (default: the run's eval.image_size, else 224)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward")
    p.add_argument("--actors", type=positive_int, default=1,
                   help="backbone actors (each loads the model once)")
    p.add_argument("--gpus", action="store_true", help="one GPU to each actor")
    p.add_argument("--cpus-per-actor", type=positive_int, default=1,
                   help="CPUs (and torch threads) of each actor")
    p.add_argument("--part-rows", type=positive_int,
                   help="rows per Parquet part (default: 10000, fewer for patch grids)")
    p.add_argument("--incremental", action="store_true",
                   help="on a complete --out: embed only the images not in it")
    p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
    p.set_defaults(fn=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    from service.embed import check_inputs
    from service.embed.job import patch_bytes

    checked = check_inputs(args.checkpoint, args.data, args.out, args.features, args.weights,
                           args.image_size, args.incremental, args.part_rows)
    plan, spec = checked.plan, checked.spec

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    what = {"fresh": "embedding", "resume": "resuming", "incremental": "adding new images to"}
    say(f"[dino] embed: {what[plan.mode]} {args.out}: {plan.total} images to embed"
        + (f" ({len(plan.done)} already in {len(plan.manifest['parts'])} parts)"
           if plan.done else "")
        + f"; {spec.features}, dim {spec.dim}, side {spec.image_size}")
    if spec.features == "patch":
        n = patch_bytes(checked)
        say(f"[dino] embed: patch grids take {plan.total} x {spec.tokens} tokens x {spec.dim} "
            f"x 2 bytes = {_size(n)}")
    return _run(args, checked, say)


def _run(args: argparse.Namespace, checked: Checked, say: Callable[[str], None]) -> int:
    from service.embed import run_embed
    from service.embed.pipeline import Resources

    if checked.plan.total:
        _start_ray(args, say)
    res = Resources(args.actors, args.gpus, args.cpus_per_actor, args.batch_size)
    try:
        result = run_embed(checked, args.out, res, say, args.verbose)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; the job resumes
        print(f"dino: interrupted: {checked.plan.manifest['count']} images are in "
              f"{len(checked.plan.manifest['parts'])} parts under {args.out}; rerun the same "
              "command to embed the rest", file=sys.stderr)
        return EXIT_SIGINT
    finally:
        flush_ray_logs()
    m, skipped = result.manifest, result.skipped
    print(f"embedded {result.embedded_now} images into {args.out} in {result.seconds:.1f} s "
          f"({m['count']} rows in {len(m['parts'])} parts, {m['features']}, dim {m['dim']}); "
          f"{len(skipped)} unreadable skipped"
          + (f", listed in {args.out.rstrip('/')}/manifest.json" if skipped else ""))
    return 0


def _start_ray(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """The cluster at ``--address`` (else RAY_ADDRESS, read as ``dino train`` reads it), or
    a local Ray of this machine's CPUs (``--num-cpus``), as ``dino data pack`` starts one,
    with at least one CPU beside the actors' for the decode tasks (else they never run).
    Ray's own start-up lines only with ``-v`` (``configure_logging=False``: its records go
    to our logging, at WARNING unless ``-v``)."""
    import ray

    from service.config import load_config
    from service.train.driver import quiet_ray_driver

    if ray.is_initialized():
        return
    cfg = load_config(overrides=[f"ray.address={args.address}"] if args.address else [])
    if not args.verbose:
        quiet_ray_driver()
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, configure_logging=False, log_to_driver=True)
        return
    cpus = args.num_cpus or os.cpu_count() or 1
    need = args.actors * args.cpus_per_actor + 1
    if cpus < need:
        say(f"[dino] embed: the local Ray gets {need} logical CPUs ({cpus} asked): "
            f"{args.actors} actors of {args.cpus_per_actor} and one for decoding")
    ray.init(address="local", num_cpus=max(cpus, need), include_dashboard=False,
             configure_logging=False, log_to_driver=True)


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} bytes"
