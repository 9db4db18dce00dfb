"""The ``dino`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time

from service.config import ConfigError, load_config, resolve_paths

EPILOG_OVERRIDES = (
    "Any config key can be overridden as key=value, e.g. "
    "`dino train --preset quickstart data.path=/imgs train.epochs=5 optim.lr=1e-3`."
)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named preset (see `dino presets`)")
    p.add_argument("--config", help="YAML file with config sections")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def unique_run_name(prefix: str = "dino") -> str:
    """``dino-20260101-120000-3fa2c1``: UTC time (sorts by start) and 24 random bits."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def _flush_ray_logs() -> None:
    """Shuts the driver's Ray down before the summary: Ray's log deduplicator prints its
    held-back "[repeated Nx]" lines at shutdown, which otherwise land after ``--json``."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.preset, args.config, overrides)
    if "run_name" not in cfg.model_fields_set:  # neither the preset, the file nor an override
        # a fresh name: two unnamed runs on one storage root never share a directory
        cfg = cfg.model_copy(update={"run_name": unique_run_name()})
    from service import runlock
    from service.trainer import train

    print(f"[dino] run {cfg.run_name!r}: {cfg.model.arch}/{cfg.model.patch_size}, "
          f"{cfg.train.epochs} epochs, global batch {cfg.train.batch_size} on "
          f"{cfg.ray.num_workers} worker(s), storage {cfg.storage.root}", flush=True)
    try:
        with runlock.hold(resolve_paths(cfg).storage.root, cfg.run_name):
            res = train(cfg)
    except runlock.RunInUseError as err:
        print(f"dino: {err}", file=sys.stderr)
        return 1
    _flush_ray_logs()
    print("\n[dino] done")
    print(f"  checkpoints : {res.run_url}  (latest: {res.checkpoint})")
    print(f"  backbone    : {res.backbone}")
    if res.tracking_uri:
        print(f"  MLflow      : {res.tracking_uri}  run {res.mlflow_run_id}")
        if res.tracking_uri.startswith("sqlite"):
            print(f"                view with: mlflow ui --backend-store-uri {res.tracking_uri}")
    if "knn_top1" in res.metrics:
        chance = 100.0 / cfg.data.procedural_classes if cfg.eval.val_path == "procedural" else None
        extra = f" (chance {chance:.1f}%)" if chance else ""
        print(f"  k-NN top-1  : {res.metrics['knn_top1']:.1f}%{extra}, "
              f"top-5 {res.metrics['knn_top5']:.1f}% (k={cfg.eval.knn_k})")
    if args.json:
        print(json.dumps({**res.__dict__}))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from service.tune import DEFAULT_SPACE, OBJECTIVE, SweepSpec, run_sweep

    cfg = load_config(args.preset, args.config, args.overrides)
    space = dict(DEFAULT_SPACE) if not args.param or args.add_default_space else {}
    for item in args.param or []:
        key, _, spec = item.partition("=")
        if not spec:
            raise ConfigError(f"--param {item!r}: use KEY=grid:a,b | choice:a,b | "
                              "uniform:lo,hi | loguniform:lo,hi")
        space[key] = spec
    spec = SweepSpec(name=args.name or f"{cfg.run_name}-sweep", space=space,
                     num_samples=args.num_samples, max_concurrent=args.max_concurrent)
    print(f"[dino] sweep {spec.name!r} over {', '.join(space)}; objective {OBJECTIVE} "
          f"(the DINO loss is not comparable across teacher temperatures)", flush=True)
    out = run_sweep(cfg, spec, resume=args.resume)
    _flush_ray_logs()
    rows = out["rows"]
    keys = list(space)
    print(f"\n[dino] sweep results ({len(rows)} trials, best first), {out['sweep_url']}")
    header = [*keys, OBJECTIVE, "teacher_entropy", "status"]
    print("  ".join(f"{h:>22}" for h in header))
    for r in rows:
        cells = [f"{r[k]:>22}" for k in keys]
        cells += [f"{r[OBJECTIVE]:>22.2f}", f"{r['teacher_entropy']:>22.3f}", f"  {r['status']}"]
        print("  ".join(cells))
    if args.json:
        print(json.dumps(out, default=str))
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    from service.presets import names

    print("\n".join(names()))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from service.config import to_yaml

    print(to_yaml(load_config(args.preset, args.config, args.overrides)), end="")
    return 0


def cmd_eval_knn(args: argparse.Namespace) -> int:
    from service.evaluate import knn_eval

    res = knn_eval(args.checkpoint, args.train, args.val, image_size=args.image_size,
                   ks=args.k, temperature=args.temperature, batch_size=args.batch_size,
                   num_workers=args.num_workers, dump=args.dump_features,
                   load=args.load_features, which=args.weights)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"k-NN on {res['n_train']} train / {res['n_val']} val images "
              f"(T={args.temperature}, {res['num_classes']} classes, "
              f"chance {100 / res['num_classes']:.1f}%)")
        print(f"{'k':>5} {'top-1':>7} {'top-5':>7}")
        for k in args.k:
            r = res["by_k"][str(k)]
            print(f"{k:>5} {r['top1']:>6.2f}% {r['top5']:>6.2f}%")
    if args.mlflow:
        return _log_eval(args, {"eval_knn_top1": res["top1"], "eval_knn_top5": res["top5"]})
    return 0


def _weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=["teacher", "student", "random"], default="teacher",
                   help="which backbone of the checkpoint; random: the same architecture "
                        "untrained, the baseline to compare against")


def _mlflow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mlflow", action="store_true",
                   help="log results to the MLflow run that trained the checkpoint")
    p.add_argument("--tracking-uri", help="MLflow URI (default: the run's tracking.uri, "
                                          "then MLFLOW_TRACKING_URI, then the local default)")


def _log_eval(args: argparse.Namespace, metrics: dict[str, float],
              artifacts: list[str] | None = None) -> int:
    from service.evaluate import checkpoint_config, checkpoint_step, log_to_checkpoint_run

    try:
        uri, run_id = log_to_checkpoint_run(
            checkpoint_config(args.checkpoint), metrics, artifacts or [],
            checkpoint_step(args.checkpoint), args.tracking_uri)
    except (ValueError, RuntimeError) as err:
        print(f"dino: {err}", file=sys.stderr)
        return 1
    print(f"logged {len(metrics)} metrics and {len(artifacts or [])} files to MLflow {uri} "
          f"run {run_id}", file=sys.stderr)
    return 0


def cmd_eval_linear(args: argparse.Namespace) -> int:
    from service.evaluate import linear_eval

    def progress(epoch: int, stats: dict[str, float]) -> None:
        print(f"[linear] epoch {epoch + 1}/{args.epochs} loss {stats['train_loss']:.4f} "
              f"lr {stats['lr']:.3g}", file=sys.stderr, flush=True)

    res = linear_eval(args.checkpoint, args.train, args.val, image_size=args.image_size,
                      epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      n_last_blocks=args.n_last_blocks, avgpool=args.avgpool,
                      num_workers=args.num_workers, output_dir=args.output_dir,
                      device=args.device, seed=args.seed, on_epoch_end=progress,
                      which=args.weights, crop_scale=args.crop_scale)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"linear probe on {res['n_train']} train / {res['n_val']} val images "
              f"({res['num_classes']} classes, chance {100 / res['num_classes']:.1f}%): "
              f"top-1 {res['top1']:.2f}%, top-5 {res['top5']:.2f}%")
    if args.mlflow:
        return _log_eval(args, {"eval_linear_top1": res["top1"], "eval_linear_top5": res["top5"]})
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from service import visualize

    one_image = args.image is not None or args.procedural_index is not None
    if not one_image and args.jaccard is None:
        print("dino attention: give --image, --procedural-index or --jaccard N", file=sys.stderr)
        return 2
    if one_image and not args.out:
        print("dino attention: --out DIR is needed to write the pictures", file=sys.stderr)
        return 2
    res: dict = {}
    if one_image:
        res = visualize.attention_pictures(args.checkpoint, args.out, args.image,
                                           args.procedural_index, args.image_size, args.keep,
                                           args.weights)
    if args.jaccard is not None:
        res["jaccard"] = visualize.jaccard_report(args.checkpoint, args.jaccard,
                                                  args.image_size, args.keep, args.weights)
    if args.json:
        print(json.dumps(res))
    else:
        for path in res.get("paths", []):
            print(path)
        if "image_jaccard" in res:
            print("Jaccard of this image per head: "
                  + " ".join(f"{j:.3f}" for j in res["image_jaccard"]))
        if "jaccard" in res:
            r = res["jaccard"]
            print(f"mask Jaccard over {r['n']} procedural images (keep {args.keep:.0%} of the "
                  f"attention): best head {r['best_head']} {r['best']:.3f}, mean {r['mean']:.3f}")
            print("per head: " + " ".join(f"{j:.3f}" for j in r["per_head"]))
    if args.mlflow:
        metrics: dict[str, float] = {}
        if "jaccard" in res:
            r = res["jaccard"]
            metrics = {"eval_jaccard_best": r["best"], "eval_jaccard_mean": r["mean"],
                       "eval_jaccard_best_head": r["best_head"],
                       **{f"eval_jaccard_head{i}": j for i, j in enumerate(r["per_head"])}}
        return _log_eval(args, metrics, res.get("paths"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from service.evaluate import export_backbone

    path = export_backbone(args.checkpoint, args.out, which=args.which)
    print(f"wrote {path}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from dino_core.data.procedural import write_image_folder

    n = write_image_folder(args.out, args.n, args.image_size, args.classes, args.seed,
                           masks=not args.no_masks, difficulty=args.difficulty)
    print(f"wrote {n} images to {args.out}")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from service import stack

    return stack.main([args.action, "--state-dir", args.state_dir])


def cmd_submit(args: argparse.Namespace) -> int:
    from service import jobs

    try:
        job_id = jobs.submit(args.address, [args.target, *args.args],
                             working_dir=args.working_dir, use_installed_package=args.installed,
                             job_id=args.job_id, entrypoint_num_cpus=args.entrypoint_num_cpus,
                             pass_secrets=args.pass_secrets)
    except ValueError as err:
        print(f"dino submit: {err}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError) as err:  # no cluster there, refused token, ...
        print(f"dino submit: {err}", file=sys.stderr)
        return 1
    print(job_id, flush=True)
    if not args.wait:
        return 0
    state = jobs.logs(job_id, follow=True, address=args.address)
    print(f"[dino] job {job_id} {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from service import jobs

    try:
        if args.jobs_command == "list":
            found = jobs.list_jobs(args.address)
            if args.json:
                print(json.dumps([j.model_dump(mode="json") for j in found]))
            for j in [] if args.json else found:
                print(f"{j.submission_id or j.job_id}  {j.status!s:<9}  {j.entrypoint}")
        elif args.jobs_command == "status":
            info = jobs.status(args.job_id, args.address)
            if args.json:
                print(json.dumps(info.model_dump(mode="json")))
            else:
                print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
        elif args.jobs_command == "logs":
            text = jobs.logs(args.job_id, follow=args.follow, address=args.address)
            if args.follow:  # streamed; text is the final status
                return 0 if text == "SUCCEEDED" else 1
            print(text, end="")
        else:
            state = jobs.stop(args.job_id, wait=not args.no_wait, address=args.address)
            print(f"{args.job_id}: {state}")
    except (ConnectionError, RuntimeError, TimeoutError) as err:  # also: no such job
        print(f"dino jobs {args.jobs_command}: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino", description="DINO self-supervised pretraining on Ray.", epilog=EPILOG_OVERRIDES
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain a backbone (or resume a run)",
                       epilog=EPILOG_OVERRIDES)
    _config_args(p)
    p.add_argument("--resume", metavar="URI", help="start from this checkpoint (dir or URL)")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("tune", help="sweep hyperparameters with Ray Tune (objective: k-NN)",
                       epilog="Default space: loss.teacher_temp x optim.momentum_teacher grid.")
    _config_args(p)
    p.add_argument("--name", help="sweep name (default: <run_name>-sweep); same name resumes")
    p.add_argument("--param", action="append", metavar="KEY=SPACE",
                   help="e.g. optim.lr=loguniform:1e-4,1e-2 or loss.teacher_temp=grid:0.04,0.07")
    p.add_argument("--add-default-space", action="store_true",
                   help="sweep the default keys as well as --param ones")
    p.add_argument("--num-samples", type=int, default=1, help="repeats of the space")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at a time")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("config", help="print the resolved config without running it")
    _config_args(p)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(fn=cmd_presets)

    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(
        dest="eval_command", required=True)
    p = ev.add_parser("knn", help="weighted k-NN on labeled train/val folders")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/URL or backbone file")
    _weights_arg(p)
    p.add_argument("--train", required=True, help="labeled train folder/URL or 'procedural'")
    p.add_argument("--val", required=True, help="labeled val folder/URL or 'procedural'")
    p.add_argument("--image-size", type=int, default=224, help="center crop side")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--dump-features", metavar="FILE", help="save features to this .pt file")
    p.add_argument("--load-features", metavar="FILE", help="reuse features from this file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _mlflow_args(p)
    p.set_defaults(fn=cmd_eval_knn)

    p = ev.add_parser("linear", help="linear probe on the frozen backbone (top-1/top-5)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/URL or backbone file")
    _weights_arg(p)
    p.add_argument("--train", required=True, help="labeled train folder/URL or 'procedural'")
    p.add_argument("--val", required=True, help="labeled val folder/URL or 'procedural'")
    p.add_argument("--epochs", type=int, default=100, help="paper: 100")
    p.add_argument("--lr", type=float, default=0.001, help="base lr at batch 256 (SGD)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-last-blocks", type=int, default=4,
                   help="CLS tokens of the last n blocks (paper: 4 for ViT-S, 1 for ViT-B)")
    p.add_argument("--avgpool", action="store_true",
                   help="append the mean patch token (paper: on for ViT-B)")
    p.add_argument("--image-size", type=int, default=224, help="crop side")
    p.add_argument("--crop-scale", type=float, default=0.08, metavar="MIN",
                   help="smallest RandomResizedCrop area of the training views (paper: 0.08; "
                        "small images with one object keep more, e.g. 0.5)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", metavar="DIR",
                   help="local folder for the probe checkpoint (rerun to resume) and results")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _mlflow_args(p)
    p.set_defaults(fn=cmd_eval_linear)

    p = sub.add_parser("attention", help="attention heat maps, masks and PCA of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/URL or backbone file")
    _weights_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", metavar="FILE_OR_URL", help="image file or URL")
    src.add_argument("--procedural-index", type=int, metavar="N",
                     help="sample N of the run's procedural validation set")
    p.add_argument("--out", metavar="DIR", help="folder for the PNG files")
    p.add_argument("--image-size", type=int, help="resize the shorter side (default: as is)")
    p.add_argument("--keep", type=float, default=0.6,
                   help="attention mass kept in the masks (paper: 0.6)")
    p.add_argument("--jaccard", type=int, metavar="N",
                   help="mean mask Jaccard over N procedural images, per head")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _mlflow_args(p)
    p.set_defaults(fn=cmd_attention)

    p = sub.add_parser("export", help="teacher backbone -> timm-compatible safetensors")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or URL")
    p.add_argument("--out", required=True, help="output .safetensors path or URL")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.set_defaults(fn=cmd_export)

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

    p = sub.add_parser("stack", help="local Ray head + S3-compatible server + MLflow server")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--state-dir", default=".dino-stack")
    p.set_defaults(fn=cmd_stack)

    address = "job API URL (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, " \
              "http://127.0.0.1:8265)"
    p = sub.add_parser("submit", help="run train/tune as a Ray job on a running cluster",
                       epilog="e.g. `dino submit --address http://head:8265 train --preset "
                              "quickstart optim.lr=1e-3`. Storage and MLflow settings go with "
                              "the job; credentials do not (see service/jobs.py).")
    p.add_argument("--address", help=address)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--working-dir", metavar="DIR",
                     help="upload DIR as the job's working dir (default: this project)")
    src.add_argument("--installed", action="store_true",
                     help="use the dino installed on the cluster image; upload nothing")
    p.add_argument("--pass-secrets", action="store_true",
                   help="also send AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY: readable by "
                        "anyone with dashboard access; for throwaway clusters only")
    p.add_argument("--job-id", help="submission id (default: generated)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0,
                   help="CPUs reserved for the job's driver (default 0: it only waits)")
    p.add_argument("--wait", "--follow", dest="wait", action="store_true", default=True,
                   help="stream the logs until the job ends; exit 0 if it SUCCEEDED (default)")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="print the job id and return")
    p.add_argument("target", choices=["train", "tune"], help="what the job runs")
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="train/tune arguments, as for `dino train|tune`")
    p.set_defaults(fn=cmd_submit)

    jb = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    jb_sub = jb.add_subparsers(dest="jobs_command", required=True)
    for name, text in [("list", "every job of the cluster"), ("status", "a job's status"),
                       ("logs", "a job's logs"), ("stop", "stop a job")]:
        p = jb_sub.add_parser(name, help=text)
        p.add_argument("--address", help=address)
        if name != "list":
            p.add_argument("job_id", metavar="JOB_ID")
        if name in ("list", "status"):
            p.add_argument("--json", action="store_true", help="the full job info as JSON")
        p.set_defaults(fn=cmd_jobs)
    jb_sub.choices["logs"].add_argument("--follow", "-f", action="store_true",
                                        help="stream until the job ends; exit 0 if SUCCEEDED")
    jb_sub.choices["stop"].add_argument("--no-wait", action="store_true",
                                        help="return without waiting for the job to end")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ray folds lines that differ only in numbers across processes ("[repeated 2x across
    # cluster]"): a restarted worker's progress lines would vanish. Read at `import ray`.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"dino: {err}", file=sys.stderr)
        return 2
    except _user_errors() as err:  # evaluated only when something was raised
        if args.verbose:
            raise
        print(f"dino: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[Exception], ...]:
    """What bad input raises (a damaged checkpoint, a missing file, an unreachable or unknown
    storage URL, a wrong argument): one line, not a traceback; ``-v`` shows the traceback."""
    from service.checkpoint import CheckpointError
    from service.storage import StorageError

    return CheckpointError, StorageError, FileNotFoundError, ValueError


if __name__ == "__main__":
    sys.exit(main())
