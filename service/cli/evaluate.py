"""``dino eval knn|linear``, ``dino attention`` and ``dino export``: evaluations of a
checkpoint, a run folder (its newest complete checkpoint) or an exported backbone."""

from __future__ import annotations

import argparse
import json
import sys

from service.cli import eval_retrieval, eval_video
from service.cli.common import log_eval, mlflow_args, positive_int, weights_arg


def _splits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir/URL, run folder/URL or backbone file")
    weights_arg(p)
    p.add_argument("--train", required=True, help="labeled train folder/URL or 'procedural'")
    p.add_argument("--val", required=True, help="labeled val folder/URL or 'procedural'")


def _settings_args(p: argparse.ArgumentParser) -> None:
    """The run settings a file without them is evaluated with (procedural set, image size)."""
    p.add_argument("--preset", help="evaluate with this preset's settings (procedural set, "
                                    "eval.image_size) instead of the checkpoint's; for a file "
                                    "that holds none (a reference .pth), the run's preset")
    p.add_argument("--config", help="the same from a YAML file (e.g. the run's config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings on top, e.g. data.procedural_image_size=48")


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(
        dest="eval_command", required=True)
    eval_video.add_parser(ev)
    eval_retrieval.add_parser(ev)
    p = ev.add_parser("knn", help="weighted k-NN on labeled train/val folders")
    _splits_args(p)
    p.add_argument("--image-size", type=positive_int,
                   help="center crop side (default: the run's eval.image_size, else 224)")
    p.add_argument("--k", type=positive_int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--dump-features", metavar="FILE", help="save features to this .pt file")
    p.add_argument("--load-features", metavar="FILE", help="reuse features from this file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _settings_args(p)
    mlflow_args(p)
    p.set_defaults(fn=cmd_eval_knn)

    p = ev.add_parser("linear", help="linear probe on the frozen backbone (top-1/top-5)")
    _splits_args(p)
    p.add_argument("--epochs", type=int, default=100, help="paper: 100")
    p.add_argument("--lr", type=float, default=0.001, help="base lr at batch 256 (SGD)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-last-blocks", type=positive_int, default=4,
                   help="CLS tokens of the last n blocks (paper: 4 for ViT-S, 1 for ViT-B)")
    p.add_argument("--avgpool", action="store_true",
                   help="append the mean patch token (paper: on for ViT-B)")
    p.add_argument("--image-size", type=positive_int,
                   help="crop side (default: the run's eval.image_size, else 224)")
    p.add_argument("--crop-scale", type=float, default=0.08, metavar="MIN",
                   help="smallest RandomResizedCrop area of the training views (paper: 0.08; "
                        "small images with one object keep more, e.g. 0.5)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", metavar="DIR",
                   help="local folder for the probe checkpoint (rerun to resume) and results")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _settings_args(p)
    mlflow_args(p)
    p.set_defaults(fn=cmd_eval_linear)

    p = sub.add_parser("attention", help="attention heat maps, masks and PCA of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/URL or backbone file")
    weights_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", metavar="FILE_OR_URL", help="image file or URL")
    src.add_argument("--procedural-index", type=int, metavar="N",
                     help="sample N of the run's procedural validation set")
    p.add_argument("--out", metavar="DIR", help="folder for the PNG files")
    p.add_argument("--image-size", type=positive_int,
                   help="resize the shorter side to this first (default: the image's own); "
                        "--max-side still applies")
    p.add_argument("--max-side", type=positive_int, default=1024,
                   help="longest side of the network input and of every picture written "
                        "(default: 1024): a larger image is shrunk to it, its sides rounded "
                        "down to multiples of the patch size; a small image's pictures are "
                        "enlarged for viewing (to 224 px) but never past it; a line on "
                        "stderr says when either happened")
    p.add_argument("--keep", type=float, default=0.6,
                   help="attention mass kept in the masks (paper: 0.6)")
    p.add_argument("--jaccard", type=positive_int, metavar="N",
                   help="mean mask Jaccard over N procedural images, per head")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    mlflow_args(p)
    p.set_defaults(fn=cmd_attention)

    p = sub.add_parser("export", help="teacher backbone -> timm-compatible safetensors, or "
                       "a checkpoint -> the reference DINO code's checkpoint.pth")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory/URL or run folder; also, for safetensors, a "
                        "reference .pth, and for reference, an exported .safetensors")
    p.add_argument("--out", required=True,
                   help="output .safetensors path or URL (--format reference: checkpoint.pth)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="safetensors: which backbone (reference: both are written)")
    p.add_argument("--format", choices=["safetensors", "reference"], default="safetensors",
                   help="reference: main_dino's checkpoint.pth layout (from a .safetensors: a "
                        "backbone-only .pth like the released ones), for the reference's "
                        "eval_knn.py / eval_linear.py / visualize_attention.py")
    p.set_defaults(fn=cmd_export)


def _say(line: str) -> None:
    """A line about how the command runs, on stderr: stdout stays the result (``--json``)."""
    print(line, file=sys.stderr, flush=True)


def cmd_eval_knn(args: argparse.Namespace) -> int:
    from service import api

    out = api.knn(args.checkpoint, args.train, args.val, weights=args.weights,
                  preset=args.preset, config=args.config, overrides=args.overrides,
                  image_size=args.image_size, ks=args.k, temperature=args.temperature,
                  batch_size=args.batch_size, num_workers=args.num_workers,
                  dump=args.dump_features, load=args.load_features)
    res = out.details
    _say(res["data"]["note"])
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
        return log_eval(args, out.metrics)
    return 0


def cmd_eval_linear(args: argparse.Namespace) -> int:
    from service import api

    def progress(epoch: int, stats: dict[str, float]) -> None:
        print(f"[linear] epoch {epoch + 1}/{args.epochs} loss {stats['train_loss']:.4f} "
              f"lr {stats['lr']:.3g}", file=sys.stderr, flush=True)

    out = api.linear(args.checkpoint, args.train, args.val, weights=args.weights,
                     preset=args.preset, config=args.config, overrides=args.overrides,
                     image_size=args.image_size, epochs=args.epochs, lr=args.lr,
                     batch_size=args.batch_size, n_last_blocks=args.n_last_blocks,
                     avgpool=args.avgpool, num_workers=args.num_workers,
                     output_dir=args.output_dir, device=args.device, seed=args.seed,
                     on_epoch_end=progress, crop_scale=args.crop_scale, on_settings=_say)
    res = out.details
    if args.json:
        print(json.dumps(res))
    else:
        print(f"linear probe on {res['n_train']} train / {res['n_val']} val images "
              f"({res['num_classes']} classes, chance {100 / res['num_classes']:.1f}%): "
              f"top-1 {res['top1']:.2f}%, top-5 {res['top5']:.2f}%")
    if args.mlflow:
        return log_eval(args, out.metrics)
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from service.evaluate import attention as visualize

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
                                           args.weights, args.max_side)
        if res["note"]:
            print(res["note"], file=sys.stderr)
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
        return log_eval(args, metrics, res.get("paths"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from service import api

    path = api.export(args.checkpoint, args.out, which=args.which, format=args.format)
    print(f"wrote {path}")
    return 0
