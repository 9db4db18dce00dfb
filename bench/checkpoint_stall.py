"""The step stall of a checkpoint: synchronous upload vs background upload, to S3.

One Ray Train worker (a local Ray) holds a DINO training state: student and teacher
MultiCropWrappers and AdamW's moments, ViT-S/16 with K=65536 by default (about 0.7 GB), and
checkpoints it the way training does (``Loop.report``: ``write_checkpoint`` to local disk,
then ``RayContext.report``), to moto's S3 server on 127.0.0.1 (started and stopped here)
through the same storage handler as training (``service.train.driver.storage_kwargs``).

- ``sync`` (the baseline): the report returns once the checkpoint is in S3;
- ``background`` (``train.checkpoint_upload=background``): Ray uploads in a thread of its
  own; the report returns once the checkpoint is on local disk.

Between two checkpoints the worker "trains" for ``--interval`` seconds (sleeps; on a GPU
the step runs on the device). The stall of a checkpoint is the time from the start of the
write to the return of the report, the time a step waits; a background upload still in
flight at the next checkpoint is waited for, inside that stall. Prints one JSON line per
checkpoint, then the medians and the ratio background / sync (target: <= 0.10).

Usage:
    python bench/checkpoint_stall.py                 # ViT-S/16, K=65536, 3 checkpoints each
    python bench/checkpoint_stall.py --quick         # ViT-tiny depth 2, K=4096 (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def training_state(arch: str, depth: int | None, out_dim: int) -> dict:
    """A state of the size training saves: both networks and AdamW with its moments."""
    import torch

    from dino_core import build_networks, build_optimizer
    from dino_core.specs import NetworkSpec

    student, teacher = build_networks(NetworkSpec(arch=arch, patch_size=16, depth=depth,
                                                  out_dim=out_dim))
    opt = build_optimizer(student)
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # materialises exp_avg and exp_avg_sq
    return {"student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": opt.state_dict(), "epoch": 0, "global_step": 0}


def worker(config: dict) -> None:
    import ray.train
    import torch

    from service.storage import checkpoints as ckpt
    from service.train.ray_context import RayContext

    ctx = RayContext(config["run_url"])
    state = training_state(config["arch"], config["depth"], config["out_dim"])
    size = sum(t.numel() * t.element_size() for part in ("student", "teacher")
               for t in state[part].values())
    size += sum(t.numel() * t.element_size() for s in state["optimizer"]["state"].values()
                for t in s.values() if torch.is_tensor(t))
    for mode in ("sync", "background"):
        for i in range(config["checkpoints"]):
            time.sleep(config["interval"])
            state["global_step"] = i
            started = time.perf_counter()
            d = tempfile.mkdtemp(prefix="dino-bench-ckpt-")
            ckpt.write_checkpoint(d, state, "bench: true\n")
            written = time.perf_counter() - started
            ctx.report({"i": i}, d, background=mode == "background")
            stall = time.perf_counter() - started
            with open(config["rows"], "a") as f:
                f.write(json.dumps({"mode": mode, "checkpoint": i, "state_gb": size / 1e9,
                                    "write_s": round(written, 3),
                                    "stall_s": round(stall, 3)}) + "\n")
        ray.train.report({"flush": mode})  # waits for the last background upload


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--depth", type=int)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--checkpoints", type=int, default=3, help="per mode")
    p.add_argument("--interval", type=float, default=20.0,
                   help="seconds of 'training' between checkpoints")
    p.add_argument("--quick", action="store_true", help="tiny state, 2 checkpoints, 3 s")
    args = p.parse_args()
    if args.quick:
        args.arch, args.depth, args.out_dim, args.checkpoints, args.interval = (
            "vit_tiny", 2, 4096, 2, 3.0)

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from service.devtools import stack
    from service.devtools.processes import stop
    from service.train.driver import storage_kwargs

    work = Path(tempfile.mkdtemp(prefix="dino-bench-stall-"))
    s3 = stack.start_s3(work / "s3")
    os.environ.update(s3.env)
    try:
        bucket = stack.create_bucket(s3, prefix="stall")
        root = f"s3://{bucket}/runs"
        ray.init(address="local", num_cpus=2, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=None, log_to_driver=True,
                 runtime_env={"env_vars": {**s3.env, "PYTHONPATH": str(REPO)}})
        trainer = TorchTrainer(
            worker,
            train_loop_config={"run_url": f"{root}/stall", "arch": args.arch,
                               "depth": args.depth, "out_dim": args.out_dim,
                               "checkpoints": args.checkpoints, "interval": args.interval,
                               "rows": str(work / "rows.jsonl")},
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(
                name="stall", checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                **storage_kwargs(root)))
        trainer.fit()
        ray.shutdown()
    finally:
        stop(s3)
    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    for r in rows:
        print(json.dumps(r))
    med = {m: statistics.median(r["stall_s"] for r in rows if r["mode"] == m)
           for m in ("sync", "background")}
    ratio = med["background"] / med["sync"]
    print(json.dumps({"summary": "checkpoint stall", "state_gb": round(rows[0]["state_gb"], 3),
                      "sync_median_s": med["sync"], "background_median_s": med["background"],
                      "ratio_background_over_sync": round(ratio, 3), "target": 0.10,
                      "met": ratio <= 0.10}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
