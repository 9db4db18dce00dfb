"""``dino embed``: the embeddings of a folder, a URL or a packed set, written as Parquet
parts and a manifest (``service.embed``); a rerun resumes, ``--incremental`` adds new
images (``service.api.embed``)."""

from __future__ import annotations

import argparse
import sys

from service.cli.common import flush_ray_logs, positive_int, weights_arg

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
    from service import api

    try:
        result = api.embed(args.checkpoint, args.data, args.out, features=args.features,
                           weights=args.weights, image_size=args.image_size,
                           batch_size=args.batch_size, actors=args.actors, gpus=args.gpus,
                           cpus_per_actor=args.cpus_per_actor, part_rows=args.part_rows,
                           incremental=args.incremental, address=args.address,
                           num_cpus=args.num_cpus, verbose=args.verbose)
    except api.EmbedInterrupted as err:  # Ctrl-C: one line, not a traceback; the job resumes
        flush_ray_logs()
        print(f"dino: {err}", file=sys.stderr)
        return EXIT_SIGINT
    flush_ray_logs()
    m, skipped = result.manifest, result.skipped
    print(f"embedded {result.embedded_now} images into {args.out} in {result.seconds:.1f} s "
          f"({m['count']} rows in {len(m['parts'])} parts, {m['features']}, dim {m['dim']}); "
          f"{len(skipped)} unreadable skipped"
          + (f", listed in {args.out.rstrip('/')}/manifest.json" if skipped else ""))
    return 0
