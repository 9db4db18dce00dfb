"""``dino tune``: a hyperparameter sweep with Ray Tune (objective: k-NN top-1)."""

from __future__ import annotations

import argparse
import json

from service.cli.common import config_args, flush_ray_logs
from service.config import ConfigError, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="sweep hyperparameters with Ray Tune (objective: k-NN)",
                       epilog="Default space: loss.teacher_temp x optim.momentum_teacher grid.")
    config_args(p)
    p.add_argument("--name", help="sweep name (default: <run_name>-sweep); with --resume, "
                                  "the sweep to continue")
    p.add_argument("--param", action="append", metavar="KEY=SPACE",
                   help="e.g. optim.lr=loguniform:1e-4,1e-2 or loss.teacher_temp=grid:0.04,0.07")
    p.add_argument("--add-default-space", action="store_true",
                   help="sweep the default keys as well as --param ones")
    p.add_argument("--num-samples", type=int, default=1, help="repeats of the space")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at a time")
    p.add_argument("--scheduler", choices=("asha", "pbt", "pb2"), default="asha",
                   help="asha (default): stops weak trials early; pbt: population-based "
                        "training, losing trials copy a winner's checkpoint and go on with "
                        "perturbed values (the population finds a schedule); pb2: PBT whose "
                        "new values come from a GP bandit (needs GPy: the [pbt] extra)")
    p.add_argument("--perturbation-interval", type=int, default=1, metavar="EPOCHS",
                   help="pbt/pb2: epochs between exploits (default 1: k-NN, the objective, "
                        "is measured once an epoch)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep from its own record (sweep.json): "
                        "finished trials are kept, the others continue from their checkpoints")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from service.sweep import DEFAULT_SPACE, OBJECTIVE, SweepSpec, run_sweep

    cfg = load_config(args.preset, args.config,
                      [*args.overrides, *(["ray.verbose=true"] if args.verbose else [])])
    space = dict(DEFAULT_SPACE) if not args.param or args.add_default_space else {}
    for item in args.param or []:
        key, _, spec = item.partition("=")
        if not spec:
            raise ConfigError(f"--param {item!r}: use KEY=grid:a,b | choice:a,b | "
                              "uniform:lo,hi | loguniform:lo,hi")
        space[key] = spec
    spec = SweepSpec(name=args.name or f"{cfg.run_name}-sweep", space=space,
                     num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                     scheduler=args.scheduler, perturbation_interval=args.perturbation_interval)
    if args.perturbation_interval < 1:
        raise ConfigError(f"--perturbation-interval {args.perturbation_interval}: give a "
                          "number of epochs >= 1")
    print(f"[dino] sweep {spec.name!r} over {', '.join(space)}; objective {OBJECTIVE} "
          f"(the DINO loss is not comparable across teacher temperatures)", flush=True)
    out = run_sweep(cfg, spec, resume=args.resume)
    flush_ray_logs()
    rows = out["rows"]
    print(f"\n[dino] sweep results ({len(rows)} trials, best first), {out['sweep_url']}")
    print(results_table(rows, list(space)))
    if args.json:
        print(json.dumps(out, default=str))
    return 0


def results_table(rows: list[dict], keys: list[str]) -> str:
    """The swept values, the best k-NN top-1, the teacher's entropy and the epochs done of
    each trial, as it last reported each; ``-`` for a value it never reported."""
    from service.sweep import OBJECTIVE

    columns = [*keys, OBJECTIVE, "teacher_entropy", "epochs"]
    formats = {OBJECTIVE: "{:.2f}", "teacher_entropy": "{:.3f}", "epochs": "{:d}"}
    lines = ["  ".join(f"{h:>22}" for h in [*columns, "status"])]
    for r in rows:
        cells = ["-" if r[c] is None else formats.get(c, "{}").format(r[c]) for c in columns]
        lines.append("  ".join([*(f"{c:>22}" for c in cells), f"  {r['status']}"]))
    return "\n".join(lines)
