"""``dino eval retrieval`` and ``dino eval copydetect``: the paper's image retrieval (revisited
Oxford/Paris, mAP Medium/Hard) and copy detection (Copydays "strong", mAP) on the procedural
stand-ins or on local copies of the datasets."""

from __future__ import annotations

import argparse
import json
import math

from service.cli.common import log_eval, mlflow_args, positive_int, weights_arg

SCALES = [1.0, 1 / math.sqrt(2), 0.5]  # the reference's multi-scale (dino_core.eval.retrieval)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir/URL, run folder/URL or backbone file")
    weights_arg(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the procedural set")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    mlflow_args(p)


def add_parser(ev: argparse._SubParsersAction) -> None:
    p = ev.add_parser("retrieval", help="image retrieval mAP (revisited Oxford/Paris protocol)")
    p.add_argument("--data", default="procedural",
                   help="'procedural' (object instances drawn in code) or a local folder "
                        "holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    p.add_argument("--dataset", default="roxford5k", help="roxford5k, rparis6k, ... (folder data)")
    p.add_argument("--image-size", type=positive_int,
                   help="images shrunk to fit this side (default: 224 as the reference; "
                        "procedural: the run's eval.image_size)")
    p.add_argument("--scales", type=float, nargs="+", default=SCALES,
                   help="multi-scale features (default: 1 0.707 0.5 as the reference; 1: one)")
    p.add_argument("--crop-queries", action="store_true",
                   help="crop queries to their bbx (revisitop's protocol; the DINO reference "
                        "does not)")
    p.add_argument("--instances", type=positive_int, default=20, help="procedural queries")
    p.add_argument("--renderings", type=int, default=4,
                   help="procedural renderings per instance (1 query, the rest positives)")
    p.add_argument("--procedural-distractors", type=int, default=20, metavar="N")
    _common(p)
    p.set_defaults(fn=cmd_eval_retrieval)

    p = ev.add_parser("copydetect", help="copy detection mAP (Copydays 'strong' protocol)")
    p.add_argument("--data", default="procedural",
                   help="'procedural' (strong edits drawn in code) or a local Copydays folder "
                        "(original/, strong/)")
    p.add_argument("--distractors", metavar="DIR",
                   help="distractor images added to the database (default: <data>/distractors "
                        "if present; the paper: 10k YFCC100M images)")
    p.add_argument("--whitening", metavar="DIR",
                   help="images to learn the PCA whitening on (default: the distractors; the "
                        "paper: 20k other YFCC100M images)")
    p.add_argument("--no-whitening", action="store_true", help="l2-normalise only")
    p.add_argument("--image-size", type=positive_int,
                   help="square side (default: 320 as the reference; procedural: the run's "
                        "eval.image_size)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--originals", type=positive_int, default=20, help="procedural originals")
    p.add_argument("--copies", type=positive_int, default=2, help="procedural copies each")
    p.add_argument("--procedural-distractors", type=int, default=40, metavar="N")
    _common(p)
    p.set_defaults(fn=cmd_eval_copydetect)


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from service import api

    out = api.retrieval(args.checkpoint, args.data, weights=args.weights, dataset=args.dataset,
                        image_size=args.image_size, scales=args.scales,
                        crop_queries=args.crop_queries, num_instances=args.instances,
                        renderings=args.renderings, distractors=args.procedural_distractors,
                        seed=args.seed, device=args.device)
    res = out.details
    if args.json:
        print(json.dumps(res))
    else:
        print(f"retrieval on {res['dataset']}: {res['n_queries']} queries, {res['n_gallery']} "
              f"gallery images, side {res['image_size']}, scales "
              + " ".join(f"{s:.3g}" for s in res["scales"]))
        print(f"{'setting':>8} {'mAP':>7} " + " ".join(
            f"{'mP@' + k:>7}" for k in next(iter(res["by_setting"].values()))["mp_at_k"]))
        for name, r in res["by_setting"].items():
            print(f"{name:>8} {r['map']:>6.2f}% "
                  + " ".join(f"{v:>6.2f}%" for v in r["mp_at_k"].values()))
    if args.mlflow:
        return log_eval(args, out.metrics)
    return 0


def cmd_eval_copydetect(args: argparse.Namespace) -> int:
    from service import api

    out = api.copydetect(args.checkpoint, args.data, weights=args.weights,
                         distractors=args.distractors, whitening=args.whitening,
                         whiten=not args.no_whitening, image_size=args.image_size,
                         batch_size=args.batch_size, num_originals=args.originals,
                         copies=args.copies, num_distractors=args.procedural_distractors,
                         seed=args.seed, device=args.device)
    res = out.details
    if args.json:
        print(json.dumps(res))
    else:
        how = (f"whitened on {res['whitening_images']} images" if res["whitened"]
               else "not whitened")
        print(f"copy detection: {res['n_queries']} strong copies against {res['n_originals']} "
              f"originals + {res['n_distractors']} distractors, side {res['image_size']}, "
              f"{how}")
        for name, m in res["by_block"].items():
            print(f"{name:>12} mAP {m:.2f}%")
    if args.mlflow:
        return log_eval(args, out.metrics)
    return 0
