"""``dino tune``: a hyperparameter sweep with Ray Tune (objective: k-NN top-1;
``service.api.tune``)."""

from __future__ import annotations

import argparse
import json

from service.cli.common import config_args, flush_ray_logs


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
    from service import api

    params = {}
    for item in args.param or []:
        key, _, spec = item.partition("=")
        params[key] = spec
    res = api.tune(args.preset, args.config, args.overrides, params=params,
                   add_default_space=args.add_default_space, name=args.name,
                   num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                   scheduler=args.scheduler, perturbation_interval=args.perturbation_interval,
                   resume=args.resume, verbose=args.verbose,
                   say=lambda line: print(line, flush=True))
    flush_ray_logs()
    print(f"\n[dino] sweep results ({len(res.rows)} trials, best first), {res.sweep_url}")
    print(results_table(res.rows, res.keys))
    if args.json:
        print(json.dumps({"rows": res.rows, "sweep_url": res.sweep_url,
                          "parent_run_id": res.parent_run_id}, default=str))
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
