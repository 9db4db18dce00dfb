"""``dino data``: the procedural labeled image set written to a folder."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write the procedural labeled image set to a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=float, default=1.0,
                   help="1: cluttered, rotated, any size; 0: flat, upright, centred")
    p.add_argument("--no-masks", action="store_true")
    p.set_defaults(fn=cmd_data)



def cmd_data(args: argparse.Namespace) -> int:
    from dino_core.data.procedural import write_image_folder

    n = write_image_folder(args.out, args.n, args.image_size, args.classes, args.seed,
                           masks=not args.no_masks, difficulty=args.difficulty)
    print(f"wrote {n} images to {args.out}")
    return 0
