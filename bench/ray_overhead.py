"""The training step under Ray Train vs. the same loop without Ray, on this machine.

Both sides run the same function, :func:`loop`: the project's step (``bench/step.py``'s
``dino_core`` variant, ``ProjectStep`` without options) on synthetic crops, in a fresh
process each time, with the same torch threads, batch and steps:

- ``plain``: a subprocess of this script (``python bench/ray_overhead.py --worker ...``);
- ``ray``: a one-worker ``TorchTrainer`` (the worker given every CPU) on a local Ray that is
  started once, before the first run, and stays up through both sides' runs (its daemons
  are the same background for both; the Ray start is in no timing).

Every run builds the networks, warms up ``--warmup`` steps, then times ``--windows`` windows
of ``--steps`` steps and hands back each window's seconds per step. The sides take turns,
``--rounds`` runs each (``bench/fair.py``: plain ray, ray plain, ...). Printed, one JSON line:
images/s of each side as the median and spread ([min, max]) over every timed window of its
runs, ``ratio`` = ray median / plain median, ``ratio_spread`` the range of the per-round
ratios (each run's median against the other side's run of the same round), and ``run_s``
per side: each run from launch to return (process start, imports, the Ray Train controller
for ``ray``), median and spread, without a ratio: it is start-up, not the step.

Usage: ``python bench/ray_overhead.py [--setting small] [--rounds 3]`` (about three minutes);
``--quick`` is the test's setting (2 rounds of a few steps at batch 8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fair import alternate, fields, paired_ratios, rates  # noqa: E402
from local_ray import local_ray  # noqa: E402
from step import (  # noqa: E402
    SETTINGS,
    ProjectStep,
    networks,
    synthetic_crops,
    window_seconds,
)


def loop(config: dict) -> None:
    """``warmup`` steps, then ``windows`` windows of ``steps`` steps; writes the seconds per
    step of each window, as JSON, to ``config["out"]``."""
    torch.set_num_threads(config["threads"])
    s = SETTINGS[config["setting"]]
    device = torch.device("cpu")
    student, teacher = networks(s)
    step = ProjectStep(student, teacher, s.out_dim, device, options=set())
    crops = synthetic_crops(s, config["batch"], device)
    window_seconds(step, crops, device, config["warmup"])
    seconds = [window_seconds(step, crops, device, config["steps"])
               for _ in range(config["windows"])]
    with open(config["out"], "w") as f:
        json.dump({"seconds": seconds, "threads": torch.get_num_threads()}, f)


def run_plain(config: dict) -> dict:
    """:func:`loop` in a fresh Python process without Ray."""
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)],
                   check=True)
    with open(config["out"]) as f:
        return json.load(f)


def run_ray(config: dict) -> dict:
    """:func:`loop` in a one-worker ``TorchTrainer`` on the Ray this process started."""
    import ray.train
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory(prefix="dino-bench-ro-") as storage:
        TorchTrainer(
            loop, train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=1, resources_per_worker={"CPU": config["threads"]}),
            run_config=ray.train.RunConfig(name="ray-overhead", storage_path=storage),
        ).fit()
    with open(config["out"]) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run first")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, taking turns")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true",
                   help="the test's setting: batch 8, 2 rounds of 2 windows of 2 steps")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a plain run's config (JSON)
    args = p.parse_args(argv)
    if args.worker:
        loop(json.loads(args.worker))
        return 0
    if args.quick:
        args.batch, args.steps, args.windows, args.warmup, args.rounds = 8, 2, 2, 1, 2
    work = tempfile.mkdtemp(prefix="dino-bench-ro-")
    runs = {"plain": 0, "ray": 0}
    wall: dict[str, list[float]] = {"plain": [], "ray": []}

    def side(name: str, fn):
        def run() -> list[float]:
            runs[name] += 1
            config = {"setting": args.setting, "batch": args.batch, "steps": args.steps,
                      "windows": args.windows, "warmup": args.warmup,
                      "threads": args.threads,
                      "out": os.path.join(work, f"{name}-{runs[name]}.json")}
            t0 = time.perf_counter()
            got = fn(config)
            wall[name].append(time.perf_counter() - t0)
            assert got["threads"] == args.threads, got  # the same threads on both sides
            return got["seconds"]
        return run

    t0 = time.perf_counter()
    # as ``dino train`` starts one: the dashboard hosts the State API that Ray Train's
    # controller polls
    path = os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])
    try:
        with local_ray(args.threads, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=None, log_to_driver=True,
                       runtime_env={"env_vars": {"PYTHONPATH": path}}):
            got = alternate({"plain": side("plain", run_plain), "ray": side("ray", run_ray)},
                            args.rounds, warmup=0)  # each run warms itself up
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ips = {name: [r for run in runs_ for r in rates(args.batch, run)]
           for name, runs_ in got.items()}
    per_run = {name: [statistics.median(rates(args.batch, run)) for run in runs_]
               for name, runs_ in got.items()}
    pairs = paired_ratios(per_run["ray"], per_run["plain"])
    print(json.dumps({
        "bench": "ray_overhead", "setting": args.setting, "batch": args.batch,
        "threads": args.threads, "rounds": args.rounds, "windows_per_run": args.windows,
        "steps_per_window": args.steps, "warmup_steps": args.warmup,
        **fields("plain_img_per_s", ips["plain"], 1), **fields("ray_img_per_s", ips["ray"], 1),
        "ratio": round(statistics.median(ips["ray"]) / statistics.median(ips["plain"]), 3),
        "ratio_spread": [round(min(pairs), 3), round(max(pairs), 3)],
        **fields("plain_run_s", wall["plain"], 1), **fields("ray_run_s", wall["ray"], 1),
        "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
