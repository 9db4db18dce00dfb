"""``dino train``: pretrain a backbone, or resume a run."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from functools import partial
from typing import TextIO

from service import storage
from service.cli.common import EPILOG_OVERRIDES, config_args, flush_ray_logs, unique_run_name
from service.config import DinoConfig, ProceduralSource, load_config, resolve_paths


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
    overrides = list(args.overrides)
    if args.verbose:
        overrides.append("ray.verbose=true")
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.preset, args.config, overrides)
    if args.replay:
        cfg = _replay(args.replay, cfg, overrides)
    elif "run_name" not in cfg.model_fields_set:  # neither the preset, the file nor an override
        # a fresh name: two unnamed runs on one storage root never share a directory
        cfg = cfg.model_copy(update={"run_name": unique_run_name()})
    from service.storage import runlock
    from service.train.driver import train, workers_label

    taught = f" distilled from {cfg.train.distill.teacher}" if cfg.train.distill.teacher else ""
    print(f"[dino] run {cfg.run_name!r}: {cfg.model.arch}/{cfg.model.patch_size}{taught}, "
          f"{cfg.train.epochs} epochs, global batch {cfg.train.batch_size} on "
          f"{workers_label(cfg)} worker(s), storage {cfg.storage.root}", flush=True)
    try:
        with runlock.hold(resolve_paths(cfg).storage.root, cfg.run_name):
            res = train(cfg)
    except KeyboardInterrupt:
        flush_ray_logs()
        print(f"\n{interrupted_notice(cfg)}", file=sys.stderr)
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
        chance = 100.0 / cfg.data.procedural_classes if procedural else None
        extra = f" (chance {chance:.1f}%)" if chance else ""
        say(f"  k-NN top-1  : {res.metrics['knn_top1']:.1f}%{extra}, "
            f"top-5 {res.metrics['knn_top5']:.1f}% (k={cfg.eval.knn_k})")
    if json_out is not None:
        print(json.dumps({**res.__dict__}), file=json_out)
    return 0


def _replay(target: str, command: DinoConfig, overrides: list[str]) -> DinoConfig:
    """The config of ``--replay``, and its one line saying what is replayed."""
    from service.sweep import replay

    record, chosen = replay.load(target, command.storage.root)
    name = command.run_name if "run_name" in command.model_fields_set else None
    cfg = replay.replay_config(command, record, chosen, overrides, name)
    print(replay.describe(chosen, cfg.run_name), flush=True)
    return cfg


def interrupted_notice(cfg: DinoConfig) -> str:
    """What a Ctrl-C leaves: where to resume from only when the run saved a checkpoint;
    stopped before its first one, a rerun starts again from the beginning (or from
    ``train.resume``), and saying "resume it" would promise work that is not there."""
    from service.storage import checkpoints as ckpt

    resolved = resolve_paths(cfg)
    run = storage.join(resolved.storage.root, cfg.run_name)
    head = f"dino: interrupted: run {cfg.run_name!r} stopped"
    try:
        saved = bool(ckpt.committed(run))
    except Exception:  # noqa: BLE001 - storage does not answer: say no more than is known
        return (f"{head}; the checkpoints it saved, if any, are in {run}: the same command "
                "resumes from the last one")
    if saved:
        return (f"{head}; its checkpoints are in {run}. Resume it with the same command (or "
                f"`dino train ... run_name={cfg.run_name}`).")
    start = (f"from train.resume={resolved.train.resume} again" if resolved.train.resume
             else "from the beginning (step 0)")
    return (f"{head} before its first checkpoint: nothing was saved, and running it again "
            f"starts {start}.")
