"""``dino train``: pretrain a backbone, or resume a run (``service.api.train``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from functools import partial
from typing import TextIO

from service.cli.common import EPILOG_OVERRIDES, config_args, flush_ray_logs
from service.config import ProceduralSource


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a backbone (or resume a run)",
                       epilog=EPILOG_OVERRIDES)
    config_args(p)
    p.add_argument("--resume", metavar="URI", help="start from this checkpoint (dir or URL)")
    p.add_argument("--replay", metavar="SWEEP[/TRIAL]",
                   help="train a fresh run with the values a population-based sweep's trial "
                        "(default: its best) trained with, changed at the same steps; the "
                        "sweep's config, under storage.root (or a sweep's URL), with the "
                        "command's ray/tracking/storage sections and key=value overrides")
    p.add_argument("--in-process", action="store_true",
                   help="no Ray: train on one worker in this process (a laptop, a small run; "
                        "the checkpoints are the same, and resume under Ray)")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(fn=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    if not args.json:
        return _train(args)
    # stdout holds the JSON alone (for jq): every other line, the workers' that Ray forwards
    # included, goes to stderr
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        code = _train(args, stdout)
    return code


def _train(args: argparse.Namespace, json_out: TextIO | None = None) -> int:
    from service import api

    cfg = api.train_config(args.preset, args.config, args.overrides, resume=args.resume,
                           replay=args.replay, verbose=args.verbose)
    try:
        res = api.train(config=cfg, in_process=args.in_process)
    except KeyboardInterrupt as err:
        flush_ray_logs()
        print(f"\n{err}" if isinstance(err, api.TrainInterrupted) else "\ndino: interrupted",
              file=sys.stderr)
        return 130
    flush_ray_logs()
    say = partial(print, file=sys.stdout)  # stderr with --json (see cmd_train)
    say("\n[dino] done")
    say(f"  checkpoints : {res.run_url}  (latest: {res.checkpoint})")
    say(f"  backbone    : {res.backbone}")
    if res.tracking_uri:
        say(f"  MLflow      : {res.tracking_uri}  run {res.mlflow_run_id}")
        if res.tracking_uri.startswith("sqlite"):
            say(f"                view with: mlflow ui --backend-store-uri {res.tracking_uri}")
    if "knn_top1" in res.metrics:
        procedural = isinstance(cfg.eval.val_source, ProceduralSource)
        chance = f" (chance {100.0 / cfg.data.procedural_classes:.1f}%)" if procedural else ""
        say(f"  k-NN top-1  : {res.metrics['knn_top1']:.1f}%{chance}, "
            f"top-5 {res.metrics['knn_top5']:.1f}% (k={cfg.eval.knn_k})")
    if json_out is not None:
        print(json.dumps({**res.__dict__}), file=json_out)
    return 0


