"""The training step under Ray Train vs. the same loop without Ray, on this machine.

Runs the project's step (``bench/step.py``'s ``dino_core`` variant) for a fixed number of
steps three ways: in this process, in a one-worker ``TorchTrainer`` on a local Ray instance
(the worker given every CPU), and in this process again, and prints one JSON line with
images/s of each and ``ratio`` = Ray / mean of the two plain runs. Same threads everywhere.

Usage: ``python bench/ray_overhead.py [--setting small] [--steps 20]`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import SETTINGS, ProjectStep, networks, synthetic_crops, time_steps  # noqa: E402


def loop(config: dict) -> None:
    """Times ``steps`` steps (best of three windows) and writes images/s to ``out``."""
    torch.set_num_threads(config["threads"])
    s = SETTINGS[config["setting"]]
    device = torch.device("cpu")
    student, teacher = networks(s)
    step = ProjectStep(student, teacher, s.out_dim, device, compile_backbone=False)
    crops = synthetic_crops(s, config["batch"], device)
    sec = time_steps(step, crops, device, warmup=3, steps=config["steps"])
    with open(config["out"], "w") as f:
        f.write(str(config["batch"] / sec))


def plain(config: dict) -> float:
    loop(config)
    with open(config["out"]) as f:
        return float(f.read())


def under_ray(config: dict) -> float:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=config["threads"], include_dashboard=True,
             log_to_driver=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        with tempfile.TemporaryDirectory() as storage:
            TorchTrainer(
                loop, train_loop_config=config,
                scaling_config=ray.train.ScalingConfig(
                    num_workers=1, resources_per_worker={"CPU": config["threads"]}),
                run_config=ray.train.RunConfig(name="ray-overhead", storage_path=storage),
            ).fit()
    finally:
        ray.shutdown()
    with open(config["out"]) as f:
        return float(f.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    fd, out = tempfile.mkstemp(prefix="ray-overhead-")
    os.close(fd)
    config = {"setting": args.setting, "batch": args.batch, "steps": args.steps,
              "threads": args.threads, "out": out}
    t0 = time.perf_counter()
    first = plain(config)
    ray_ips = under_ray(config)
    second = plain(config)
    os.unlink(out)
    base = (first + second) / 2
    print(json.dumps({"bench": "ray_overhead", "setting": args.setting, "batch": args.batch,
                      "threads": args.threads, "plain_img_per_s": [round(first, 1),
                                                                   round(second, 1)],
                      "ray_img_per_s": round(ray_ips, 1), "ratio": round(ray_ips / base, 3),
                      "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
