"""``dino data``: the procedural labeled image set written to a folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli.common import positive_int
from service.config import ConfigError, DinoConfig, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write the procedural labeled image set to a folder",
                       epilog="Without --preset the data section's defaults are used; with "
                              "--preset quickstart the images look like the quickstart's.")
    p.add_argument("--out", required=True, help="a new or empty folder")
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


def cmd_data(args: argparse.Namespace) -> int:
    from dino_core.data.procedural import write_image_folder

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
