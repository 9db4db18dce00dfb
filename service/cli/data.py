"""``dino data``: the procedural labeled image set written to a folder; ``dino data pack``:
a folder or URL of images packed into WebDataset shards for training at scale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli.common import positive_int
from service.config import ConfigError, DinoConfig, load_config

EXIT_SIGINT = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
INTERRUPTED = ("interrupted before a shard was packed, or while the manifest was written: "
               "rerun the same command to pack into {dest}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write the procedural labeled image set to a folder; "
                                    "`dino data pack SRC DEST`: pack images into shards",
                       epilog="Without --preset the data section's defaults are used; with "
                              "--preset quickstart the images look like the quickstart's.")
    p.add_argument("--out", help="a new or empty folder")
    p.add_argument("--preset", help="take image size, classes, difficulty and colours from "
                                    "this preset's data section")
    p.add_argument("--n", type=positive_int, default=1200, help="images to write")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--classes", type=positive_int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=float,
                   help="1: cluttered, rotated, any size; 0: flat, upright, centred")
    p.add_argument("--colourful", action=argparse.BooleanOptionalAction,
                   help="random colours (--no-colourful: light shapes on dark grey)")
    p.add_argument("--no-masks", action="store_true")
    p.set_defaults(fn=cmd_data)
    verbs = p.add_subparsers(dest="data_verb", metavar="pack")
    pk = verbs.add_parser(
        "pack", help="pack a folder or URL of images into WebDataset shards + a manifest",
        epilog="Then train with data.path=DEST. Re-running the same command finishes an "
               "interrupted pack. Shards are packed in parallel as Ray tasks (a local Ray, or "
               "the cluster at --address / RAY_ADDRESS).")
    pk.add_argument("src", help="folder or URL of images (class sub-folders keep labels)")
    pk.add_argument("dest", help="folder or URL for the shards (any fsspec URL)")
    pk.add_argument("--shard-mb", type=float, default=256, help="shard size (default 256 MB)")
    pk.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    pk.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray")
    pk.add_argument("--in-process", action="store_true", help="no Ray: pack in this process")
    pk.set_defaults(fn=cmd_pack)


def cmd_pack(args: argparse.Namespace) -> int:
    try:  # the imports too: a Ctrl-C while they load (seconds) is also one line
        from service import api

        result = api.pack(args.src, args.dest, args.shard_mb, address=args.address,
                          num_cpus=args.num_cpus, in_process=args.in_process)
    except KeyboardInterrupt as err:  # Ctrl-C: one line, not a traceback; the pack resumes
        print(f"dino: {str(err) or INTERRUPTED.format(dest=args.dest)}", file=sys.stderr)
        return EXIT_SIGINT
    m = result.manifest
    unreadable = len(result.skipped) - result.bad_names
    print(f"packed {m.num_images} images into {len(m.shards)} shards under {m.prefix} in "
          f"{result.seconds:.1f} s ({result.packed_now} shards this run); "
          f"{unreadable} unreadable files skipped"
          + (f", {result.bad_names} with a name that is not UTF-8" if result.bad_names else "")
          + (f", listed in {m.prefix}/pack-report.json" if result.skipped else ""))
    print(f"train on it with: dino train data.path={m.prefix}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from dino_core.data.procedural import write_image_folder

    if not args.out:
        raise ConfigError("dino data needs --out FOLDER (or `dino data pack SRC DEST`)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new or empty folder")
    d = (load_config(args.preset) if args.preset else DinoConfig()).data
    size = args.image_size or d.procedural_image_size
    classes = args.classes or d.procedural_classes
    difficulty = d.procedural_difficulty if args.difficulty is None else args.difficulty
    colourful = d.procedural_colourful if args.colourful is None else args.colourful
    write_image_folder(out, args.n, size, classes, args.seed, masks=not args.no_masks,
                       difficulty=difficulty, colourful=colourful)
    masks = "" if args.no_masks else f", masks under {out}_masks"
    print(f"wrote {args.n} images to {out}{masks}: {size} px, {classes} classes, difficulty "
          f"{difficulty:g}, {'colourful' if colourful else 'light shapes on dark grey'}, "
          f"seed {args.seed}" + (f" (preset {args.preset})" if args.preset else ""))
    return 0
