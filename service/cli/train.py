"""``dino train``: pretrain a backbone, or resume a run."""

from __future__ import annotations

import argparse
import json

from service.cli.common import EPILOG_OVERRIDES, config_args, flush_ray_logs, unique_run_name
from service.config import ProceduralSource, load_config, resolve_paths


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a backbone (or resume a run)",
                       epilog=EPILOG_OVERRIDES)
    config_args(p)
    p.add_argument("--resume", metavar="URI", help="start from this checkpoint (dir or URL)")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(fn=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.verbose:
        overrides.append("ray.verbose=true")
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.preset, args.config, overrides)
    if "run_name" not in cfg.model_fields_set:  # neither the preset, the file nor an override
        # a fresh name: two unnamed runs on one storage root never share a directory
        cfg = cfg.model_copy(update={"run_name": unique_run_name()})
    from service.storage import runlock
    from service.train.driver import train

    print(f"[dino] run {cfg.run_name!r}: {cfg.model.arch}/{cfg.model.patch_size}, "
          f"{cfg.train.epochs} epochs, global batch {cfg.train.batch_size} on "
          f"{cfg.ray.num_workers} worker(s), storage {cfg.storage.root}", flush=True)
    with runlock.hold(resolve_paths(cfg).storage.root, cfg.run_name):
        res = train(cfg)
    flush_ray_logs()
    print("\n[dino] done")
    print(f"  checkpoints : {res.run_url}  (latest: {res.checkpoint})")
    print(f"  backbone    : {res.backbone}")
    if res.tracking_uri:
        print(f"  MLflow      : {res.tracking_uri}  run {res.mlflow_run_id}")
        if res.tracking_uri.startswith("sqlite"):
            print(f"                view with: mlflow ui --backend-store-uri {res.tracking_uri}")
    if "knn_top1" in res.metrics:
        procedural = isinstance(cfg.eval.val_source, ProceduralSource)
        chance = 100.0 / cfg.data.procedural_classes if procedural else None
        extra = f" (chance {chance:.1f}%)" if chance else ""
        print(f"  k-NN top-1  : {res.metrics['knn_top1']:.1f}%{extra}, "
              f"top-5 {res.metrics['knn_top5']:.1f}% (k={cfg.eval.knn_k})")
    if args.json:
        print(json.dumps({**res.__dict__}))
    return 0
