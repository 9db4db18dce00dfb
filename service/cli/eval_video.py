"""``dino eval video``: DAVIS 2017 video object segmentation (J&F) of a checkpoint's backbone,
on a local DAVIS folder or on the built-in procedural videos."""

from __future__ import annotations

import argparse
import json

from service.cli.common import (
    log_eval,
    mlflow_args,
    non_negative_int,
    positive_int,
    weights_arg,
)


def add_parser(ev: argparse._SubParsersAction) -> None:
    """Adds ``video`` to the ``dino eval`` subcommands."""
    p = ev.add_parser("video", help="DAVIS 2017 label propagation (J&F) of the patch features")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir/URL, run folder/URL or backbone file")
    weights_arg(p)
    p.add_argument("--data", default="procedural",
                   help="'procedural' (built-in moving shapes) or a local DAVIS 2017 root "
                        "(holding ImageSets/, JPEGImages/480p/, Annotations/480p/)")
    p.add_argument("--split", default="val", help="DAVIS split list ImageSets/2017/<split>.txt")
    p.add_argument("--n-last-frames", type=non_negative_int, default=7,
                   help="previous frames used besides the first (paper: 7)")
    p.add_argument("--topk", type=positive_int, default=5,
                   help="neighbours whose labels are averaged (paper: 5)")
    p.add_argument("--neighborhood", type=non_negative_int, default=12,
                   help="half-side in patches of the source window; 0: whole frame (paper: 12)")
    p.add_argument("--image-size", type=positive_int,
                   help="shorter side of the network input (default: the frames' own, 480 "
                        "for DAVIS 480p as in the paper)")
    p.add_argument("--videos", type=positive_int, default=4, help="procedural: number of videos")
    p.add_argument("--frames", type=positive_int, default=12,
                   help="procedural: frames per video (at least 3)")
    p.add_argument("--frame-size", type=positive_int, default=96, help="procedural: side in px")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", metavar="DIR",
                   help="write the predicted masks as palette PNGs, DIR/<video>/00000.png")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    mlflow_args(p)
    p.set_defaults(fn=cmd_eval_video)


def cmd_eval_video(args: argparse.Namespace) -> int:
    from service import api

    out = api.video(args.checkpoint, args.data, weights=args.weights, split=args.split,
                    image_size=args.image_size, n_last_frames=args.n_last_frames,
                    topk=args.topk, neighborhood=args.neighborhood, output_dir=args.out,
                    videos=args.videos, frames=args.frames, frame_side=args.frame_size,
                    device=args.device)
    res = out.details
    if args.json:
        print(json.dumps(res))
    else:
        h, w = res["input_size"]
        print(f"video segmentation on {res['n_videos']} videos, {res['n_objects']} objects "
              f"({args.data}, input {h}x{w}, patch {res['patch_size']}, "
              f"{args.n_last_frames} last frames, top-{args.topk}, "
              f"neighbourhood {args.neighborhood})")
        print(f"{'video':<24} {'J':>6} {'F':>6}")
        for name, r in res["per_video"].items():
            print(f"{name:<24} {r['j']:>6.1f} {r['f']:>6.1f}")
        print(f"J&F-mean {res['jf']:.1f}  J-mean {res['j']:.1f}  F-mean {res['f']:.1f} (percent)")
        c = res["grid_round_trip"]
        print(f"the true masks sent through the {res['patch_size']} px patch grid and back: "
              f"J&F {c['jf']:.1f}, J {c['j']:.1f}, F {c['f']:.1f} (what the grid alone costs)")
        if args.out:
            print(f"masks in {args.out}")
    if args.mlflow:
        return log_eval(args, out.metrics)
    return 0
