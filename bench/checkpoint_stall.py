"""The step stall of a checkpoint: synchronous upload vs background upload, to S3.

One Ray Train worker (a local Ray) trains and checkpoints. It trains with the project's
step (``bench/step.py``'s ``dino_core`` variant, the quickstart-sized ``small`` setting by
default, on synthetic crops) and checkpoints a DINO training state of the size training
saves: student and teacher MultiCropWrappers and AdamW's moments, ViT-S/16 with K=65536 by
default (about 0.7 GB). It checkpoints the way training does (``Loop.report``:
``write_checkpoint`` to local disk, then ``RayContext.report``), to moto's S3 server on
127.0.0.1 (started and stopped here) through the same storage handler as training
(``service.train.driver.storage_kwargs``):

- ``sync`` (the baseline): the report returns once the checkpoint is in S3;
- ``background`` (``train.checkpoint_upload=background``): Ray uploads in a thread of its
  own; the report returns once the checkpoint is on local disk, and the upload competes with
  the training steps that follow it (for the CPU, here: moto, the upload and the step share
  the machine's cores);
- ``none``: no checkpoint, the reference.

What is measured. After ``--warmup`` untimed steps, the worker runs cycles; a cycle is a
checkpoint (none for ``none``), then ``--steps-between`` training steps, then a report
without a checkpoint, which waits for an upload still in flight (as the next checkpoint's
report would in training: one upload in flight). ``cycle_s`` is the wall time of the whole
cycle. The three kinds take turns, ``--checkpoints`` rounds of one cycle each, the first
kind rotating (``bench/fair.py``: none sync background, sync background none, ...). The stall
of a checkpoint is ``stall_s`` = its cycle's time minus the median time of the ``none``
cycles: the extra time of the steps around a checkpoint over the same steps without one,
which includes the write, the report call, every step slowed by the upload running beside it
and any wait for the upload at the end. ``call_s`` (write and report call, the time the step
loop is blocked) is printed beside it. One JSON line per cycle, then a summary: per mode the
median and spread ([min, max]) of ``stall_s`` and ``call_s``, ``none``'s cycle time, and
the ratio of the median stalls background / sync (target: <= 0.10); both modes do the same
work (the same state, steps and storage).

Usage:
    python bench/checkpoint_stall.py                 # ViT-S/16, K=65536, 3 rounds
    python bench/checkpoint_stall.py --quick         # ViT-tiny depth 1, K=1024 (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from fair import fields  # noqa: E402


def training_state(arch: str, depth: int | None, out_dim: int, hidden: int = 2048) -> dict:
    """A state of the size training saves: both networks and AdamW with its moments."""
    import torch

    from dino_core import build_networks, build_optimizer
    from dino_core.specs import NetworkSpec

    student, teacher = build_networks(NetworkSpec(arch=arch, patch_size=16, depth=depth,
                                                  out_dim=out_dim, head_hidden_dim=hidden))
    opt = build_optimizer(student)
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # materialises exp_avg and exp_avg_sq
    return {"student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": opt.state_dict(), "epoch": 0, "global_step": 0}


def worker(config: dict) -> None:
    import ray.train
    import torch
    from fair import alternate
    from step import SETTINGS, ProjectStep, networks, synthetic_crops, window_seconds

    from service.storage import checkpoints as ckpt
    from service.train.ray_context import RayContext

    torch.set_num_threads(config["threads"])
    ctx = RayContext(config["run_url"])
    state = training_state(config["arch"], config["depth"], config["out_dim"],
                           config["head_hidden"])
    size = sum(t.numel() * t.element_size() for part in ("student", "teacher")
               for t in state[part].values())
    size += sum(t.numel() * t.element_size() for s in state["optimizer"]["state"].values()
                for t in s.values() if torch.is_tensor(t))
    s = SETTINGS[config["setting"]]
    device = torch.device("cpu")
    step = ProjectStep(*networks(s), s.out_dim, device, options=set())
    crops = synthetic_crops(s, config["batch"], device)
    window_seconds(step, crops, device, config["warmup"])
    rounds = {"none": 0, "sync": 0, "background": 0}

    def cycle(mode: str):
        def run() -> dict:
            i = rounds[mode]
            rounds[mode] += 1
            state["global_step"] = i
            started = time.perf_counter()
            written = 0.0
            if mode != "none":
                d = tempfile.mkdtemp(prefix="dino-bench-ckpt-")
                ckpt.write_checkpoint(d, state, "bench: true\n")
                written = time.perf_counter() - started
                ctx.report({"mode": mode, "i": i}, d, background=mode == "background")
            called = time.perf_counter() - started
            steps = window_seconds(step, crops, device, config["steps_between"])
            t0 = time.perf_counter()
            ray.train.report({"drain": mode, "i": i})  # waits for an upload in flight
            drained = time.perf_counter() - t0
            row = {"mode": mode, "round": i, "state_gb": size / 1e9,
                   "write_s": round(written, 3), "call_s": round(called, 3),
                   "steps": config["steps_between"],
                   "steps_s": round(steps * config["steps_between"], 3),
                   "drain_s": round(drained, 3),
                   "cycle_s": round(time.perf_counter() - started, 3)}
            with open(config["rows"], "a") as f:
                f.write(json.dumps(row) + "\n")
            return row
        return run

    alternate({mode: cycle(mode) for mode in rounds}, config["checkpoints"], warmup=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_small", help="of the checkpointed state")
    p.add_argument("--depth", type=int)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--head-hidden", type=int, default=2048, help="the DINO head's hidden width")
    p.add_argument("--checkpoints", type=int, default=3, help="rounds (cycles per mode)")
    p.add_argument("--setting", default="small", help="bench/step.py setting of the steps")
    p.add_argument("--batch", type=int, default=64, help="images per training step")
    p.add_argument("--steps-between", type=int, default=40,
                   help="training steps after each checkpoint (and in each none cycle)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the training steps")
    p.add_argument("--quick", action="store_true",
                   help="a 10 MB state, 2 rounds of 3 steps at batch 8")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.depth, args.out_dim, args.checkpoints = "vit_tiny", 1, 1024, 2
        args.head_hidden = 256
        args.batch, args.steps_between, args.warmup = 8, 3, 1

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from service.devtools import stack
    from service.devtools.processes import stop
    from service.train.driver import storage_kwargs

    work = Path(tempfile.mkdtemp(prefix="dino-bench-stall-"))
    s3 = stack.start_s3(work / "s3")
    os.environ.update(s3.env)
    path = os.pathsep.join([str(REPO / "bench"), str(REPO)])
    # Ray's socket paths must stay under 108 characters: a short dir (under RAY_TMPDIR if set)
    ray_temp = tempfile.mkdtemp(prefix="dino-cs-", dir=os.environ.get("RAY_TMPDIR"))
    try:
        bucket = stack.create_bucket(s3, prefix="stall")
        root = f"s3://{bucket}/runs"
        ray.init(address="local", num_cpus=2, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=None, log_to_driver=True,
                 _temp_dir=ray_temp,
                 runtime_env={"env_vars": {**s3.env, "PYTHONPATH": path}})
        trainer = TorchTrainer(
            worker,
            train_loop_config={"run_url": f"{root}/stall", "arch": args.arch,
                               "depth": args.depth, "out_dim": args.out_dim,
                               "head_hidden": args.head_hidden,
                               "checkpoints": args.checkpoints, "setting": args.setting,
                               "batch": args.batch, "steps_between": args.steps_between,
                               "warmup": args.warmup, "threads": args.threads,
                               "rows": str(work / "rows.jsonl")},
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(
                name="stall", checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                **storage_kwargs(root)))
        trainer.fit()
    finally:
        ray.shutdown()
        stop(s3)
        shutil.rmtree(ray_temp, ignore_errors=True)
    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    shutil.rmtree(work, ignore_errors=True)
    clean = statistics.median(r["cycle_s"] for r in rows if r["mode"] == "none")
    for r in rows:
        r["stall_s"] = round(r["cycle_s"] - clean, 3)
        print(json.dumps(r))
    stalls = {m: [r["stall_s"] for r in rows if r["mode"] == m] for m in ("sync", "background")}
    calls = {m: [r["call_s"] for r in rows if r["mode"] == m] for m in ("sync", "background")}
    sync_median = statistics.median(stalls["sync"])
    # a sync stall within the noise of the none cycles (a tiny --quick state) has no ratio
    ratio = statistics.median(stalls["background"]) / sync_median if sync_median > 0 else None
    print(json.dumps({"summary": "checkpoint stall", "state_gb": round(rows[0]["state_gb"], 3),
                      "rounds": args.checkpoints, "steps_between": args.steps_between,
                      "batch": args.batch, "setting": args.setting,
                      **fields("none_cycle_s", [r["cycle_s"] for r in rows
                                                if r["mode"] == "none"]),
                      **fields("sync_stall_s", stalls["sync"]),
                      **fields("background_stall_s", stalls["background"]),
                      **fields("sync_call_s", calls["sync"]),
                      **fields("background_call_s", calls["background"]),
                      "ratio_background_over_sync": ratio and round(ratio, 3),
                      "target": 0.10, "met": None if ratio is None else ratio <= 0.10}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
