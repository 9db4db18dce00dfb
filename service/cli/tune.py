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
                     num_samples=args.num_samples, max_concurrent=args.max_concurrent)
    print(f"[dino] sweep {spec.name!r} over {', '.join(space)}; objective {OBJECTIVE} "
          f"(the DINO loss is not comparable across teacher temperatures)", flush=True)
    out = run_sweep(cfg, spec, resume=args.resume)
    flush_ray_logs()
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
