"""k-NN during training: rank 0 alone (``knn_on_rank0``, the baseline) vs. the extraction
spread over the ranks (``knn_distributed``), in real gloo process groups on CPU.

Prints one JSON line per measurement. For each world size W, W processes (one thread each)
form a gloo group on 127.0.0.1 and time both methods on rank 0 (the wall time every rank
spends in the call: the others wait in the broadcast). Both methods are warmed up alike
(``--warmup`` untimed calls each, which build the procedural splits and the allocator's
pools), then take turns with alternating order (``bench/fair.py``: rank0_only first in even
rounds, distributed first in odd ones), ``--reps`` timed calls each. Each method is printed
as its median and spread (``*_s`` and ``*_s_spread`` = [min, max] over the timed calls);
``speedup`` is the baseline's median seconds over the distributed median, and
``speedup_spread`` the range of the per-round ratios (both methods timed in the same round).
``*_cpu_s`` is the CPU time of the busiest rank in the call (median and spread), and
``cpu_speedup`` the ratio of the medians: how well the work divides, which, unlike the wall
time, processes of other users sharing the cores do not inflate. Both methods do the same
work (the same model over the same splits). ``agree`` says whether the two gave the same
top-1/top-5 exactly (the script exits 1 if not). With more processes than cores (W=3 on a
2-core machine) the ranks share cores, so the speed-up is capped by the cores, not by W: the
``note`` field says so.

Usage:
    python bench/knn_distributed.py            # CPU, about two minutes on 2 busy cores
    python bench/knn_distributed.py --quick    # seconds: the test's setting
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from fair import alternate, fields, paired_ratios, ratio  # noqa: E402

from dino_core.models.backbone import build_backbone  # noqa: E402
from service.config import load_config  # noqa: E402
from service.train.evaluation import knn_distributed, knn_on_rank0  # noqa: E402


@dataclass(frozen=True)
class Setting:
    train: int
    val: int
    image_size: int
    depth: int
    batch: int
    reps: int
    warmup: int


SETTINGS = {
    # a few hundred labeled images, ViT-tiny/16 of 4 blocks at 64 px
    "full": Setting(train=301, val=151, image_size=64, depth=4, batch=16, reps=5, warmup=1),
    "quick": Setting(train=41, val=21, image_size=32, depth=1, batch=8, reps=2, warmup=1),
}
ARCH, PATCH = "vit_tiny", 16
# forked workers inherit the parent's imports (spawned ones take ~10 s each to import torch
# and the service on a busy 2-core machine); the parent runs no torch op before forking
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ctx:
    """The part of ``RunContext`` the evaluation reads."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")


def config(s: Setting):
    return load_config(None, None, [
        f"model.arch={ARCH}", f"model.depth={s.depth}", f"eval.image_size={s.image_size}",
        f"eval.procedural_train_size={s.train}", f"eval.procedural_val_size={s.val}",
        f"eval.batch_size={s.batch}", "tracking.enabled=false"])


def _worker(rank: int, world: int, port: int, s: Setting, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        cfg, ctx = config(s), Ctx(rank, world)
        torch.manual_seed(0)  # the same weights on every rank, as the teacher's are
        model = build_backbone(ARCH, PATCH, s.image_size, depth=s.depth)
        methods = {"rank0_only": knn_on_rank0, "distributed": knn_distributed}
        results = {}

        def turn(name: str):
            def run() -> tuple[float, float]:
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                results[name] = methods[name](cfg, ctx, model, None)
                wall = time.perf_counter() - t0
                busiest = torch.tensor(time.process_time() - c0, dtype=torch.float64)
                dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
                return wall, float(busiest)
            return run

        # every rank runs the same turns in the same order (bench/fair.py's rotation)
        got = alternate({name: turn(name) for name in methods}, s.reps, s.warmup)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"seconds": {k: [w for w, _ in v] for k, v in got.items()},
                           "cpu_seconds": {k: [c for _, c in v] for k, v in got.items()},
                           "results": results}, f)
    finally:
        dist.destroy_process_group()


def _range(values: list[float]) -> list[float]:
    return [round(min(values), 2), round(max(values), 2)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the test's tiny setting")
    p.add_argument("--worlds", default="2,3", help="world sizes, comma-separated")
    p.add_argument("--reps", type=int, default=0, help="timed turns per method (0: setting's)")
    p.add_argument("--warmup", type=int, default=-1,
                   help="untimed turns per method first (-1: setting's)")
    args = p.parse_args(argv)
    s = SETTINGS["quick" if args.quick else "full"]
    if args.reps:
        s = Setting(**{**asdict(s), "reps": args.reps})
    if args.warmup >= 0:
        s = Setting(**{**asdict(s), "warmup": args.warmup})
    worlds = [int(w) for w in args.worlds.split(",")]
    if min(worlds) < 2:
        p.error("--worlds: each world size must be at least 2")
    n_cpus = cpus()
    emit({"bench": "knn_distributed", "kind": "config", "setting": "quick" if args.quick
          else "full", "arch": ARCH, "patch": PATCH, **asdict(s), "worlds": worlds,
          "threads_per_process": 1, "cpus": n_cpus, "backend": "gloo",
          "torch": torch.__version__})
    failed = False
    with tempfile.TemporaryDirectory(prefix="dino-bench-knn-") as d:
        for world in worlds:
            out = os.path.join(d, f"world{world}.json")
            mp.start_processes(_worker, args=(world, free_port(), s, out), nprocs=world,
                               start_method=START_METHOD)
            with open(out) as f:
                got = json.load(f)
            wall, cpu = got["seconds"], got["cpu_seconds"]
            a, b = got["results"]["rank0_only"], got["results"]["distributed"]
            agree = a == b
            failed |= not agree
            note = (f"{n_cpus} CPU cores: {world} one-thread processes oversubscribe them, the "
                    f"speed-up is capped near {n_cpus}x" if world > n_cpus
                    else f"{n_cpus} CPU cores: one per process")
            emit({"bench": "knn_distributed", "world_size": world,
                  **fields("rank0_only_s", wall["rank0_only"]),
                  **fields("distributed_s", wall["distributed"]),
                  "speedup": ratio(wall["rank0_only"], wall["distributed"], 2),
                  "speedup_spread": _range(paired_ratios(wall["rank0_only"],
                                                         wall["distributed"])),
                  **fields("rank0_only_cpu_s", cpu["rank0_only"]),
                  **fields("distributed_cpu_s", cpu["distributed"]),
                  "cpu_speedup": ratio(cpu["rank0_only"], cpu["distributed"], 2),
                  "cpu_speedup_spread": _range(paired_ratios(cpu["rank0_only"],
                                                             cpu["distributed"])),
                  "reps": s.reps, "agree": agree,
                  "knn_top1": b["knn_top1"], "knn_top5": b["knn_top5"],
                  "rank0_only_knn": a, "oversubscribed": world > n_cpus, "note": note})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
