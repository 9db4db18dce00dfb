"""The distributed k-NN benchmark runs at its quick setting (gloo groups of 2 and 3 CPU
processes) and prints, per world size, both timings as median and spread over turns taken
in alternating order after the same warm-up, their ratio of medians, and the two methods'
agreement; its k-NN numbers are those of one process over the same splits. The speed-ups
are not asserted: 2 busy shared cores make them noise."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.train.evaluation import knn_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "knn_distributed.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_knn_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def in_spread(r: dict, key: str) -> bool:
    low, high = r[f"{key}_spread"]
    return 0 < low <= r[key] <= high


@pytest.mark.integration  # a whole benchmark program, in its smallest mode
@pytest.mark.budget(40)
def test_knn_benchmark_prints_both_timings_ratios_and_agreement(one_torch_thread):
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    config, rows = records[0], records[1:]
    assert config["kind"] == "config" and config["setting"] == "quick"
    assert config["threads_per_process"] == 1 and config["cpus"] >= 1
    assert config["reps"] == 2 and config["warmup"] == 1  # both orders, both warmed up
    assert [r["world_size"] for r in rows] == config["worlds"] == [2, 3]
    for r in rows:
        assert r["reps"] == 2
        for key in ("rank0_only_s", "distributed_s", "rank0_only_cpu_s", "distributed_cpu_s"):
            assert in_spread(r, key), (key, r)
        # ratios of the medians (the printed medians are rounded to 1 ms)
        assert r["speedup"] == pytest.approx(r["rank0_only_s"] / r["distributed_s"], rel=0.05)
        assert r["cpu_speedup"] == pytest.approx(
            r["rank0_only_cpu_s"] / r["distributed_cpu_s"], rel=0.05)
        for key in ("speedup", "cpu_speedup"):
            # the per-round ratios; with 2 rounds the ratio of the medians (of the sums)
            # lies between them
            low, high = r[f"{key}_spread"]
            assert 0 < low <= high and low - 0.01 <= r[key] <= high + 0.01, (key, r)
        assert r["agree"] is True
        assert r["oversubscribed"] == (r["world_size"] > config["cpus"])
        assert "CPU cores" in r["note"]

    bench = bench_module()  # the printed numbers are one process's k-NN of the same model
    s = bench.SETTINGS["quick"]
    torch.manual_seed(0)
    model = bench.build_backbone(bench.ARCH, bench.PATCH, s.image_size, depth=s.depth)
    expected = knn_metrics(bench.config(s), model, torch.device("cpu"), None)
    for r in rows:
        assert r["rank0_only_knn"] == expected
        assert {"knn_top1": r["knn_top1"], "knn_top5": r["knn_top5"]} == expected
