"""The data-loading benchmark runs at its CI settings, at two small image counts, against real
services (moto's S3 server, a local Ray) and prints every row, each valid JSON with a median
rate within its spread and the ratios of the medians. The targets it prints are not
asserted: figures on a busy 2-core CI machine are too noisy for that.

It runs at half --ci's scale (batch 16, 2 MiB shards, a shuffle buffer of 32) with 80 and 128
images: 5 and 8 batches, so that each count times windows of whole rounds of the 2 loader
processes (2 and 4 batches). A 1-batch window (4 batches: 64 images here, 128 at batch 32)
times a batch that came ready with the one before it, and a per-round ratio against such a
rate can round to 0.

It starts moto and a local Ray (10-20 s on 2 cores; packing and Ray Data need it) and builds
every reader afresh in each of its turns (the loader processes, a Ray Data pipeline), which
is why its budget is above the default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = ["local_folder", "s3_per_object", "s3_shards", "ray_data"]


def in_spread(r: dict, key: str) -> bool:
    low, high = r[f"{key}_spread"]
    return 0 < low <= r[key] <= high


@pytest.mark.integration
@pytest.mark.budget(130)
def test_data_benchmark_prints_every_row_with_a_rate_and_the_targets(tmp_path):
    out = subprocess.run([sys.executable, "bench/data.py", "--ci", "--images", "80,128",
                          "--batch", "16", "--shard-mb", "2", "--shuffle-buffer", "32",
                          "--windows", "2", "--work", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line printed is a JSON row
    config = records[0]
    assert config["kind"] == "config" and config["rows"] == ROWS
    counts = config["images"]
    assert counts == [80, 128] and config["windows"] == 2 and config["batch"] == 16
    assert config["shard_bytes"] == 2 * 2**20 and config["shuffle_buffer"] == 32

    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]
    measured = {(r["row"], r["images"]): r for r in records if "row" in r}
    assert set(measured) == {(row, n) for row in ROWS for n in counts}  # none left out
    for r in measured.values():
        assert in_spread(r, "images_per_sec") and in_spread(r, "first_batch_s")
        assert r["windows"] == 2 and r["timed_batches"] >= 2 and r["canvas"] == 256
        assert r["batches_per_window"] >= 2  # a whole round of the 2 loader processes
        low, high = r["ratio_to_local_folder_spread"]
        assert 0 < low <= high
    for n in counts:
        base = measured[("local_folder", n)]["images_per_sec"]
        assert measured[("local_folder", n)]["ratio_to_local_folder_spread"] == [1.0, 1.0]
        for row in ROWS:
            r = measured[(row, n)]
            assert r["ratio_to_local_folder"] == pytest.approx(r["images_per_sec"] / base,
                                                               rel=0.01, abs=0.01)

    setup = [r for r in records if r.get("kind") == "setup"]
    assert {r["step"] for r in setup} == {"generate", "upload", "pack"}
    assert all(r["seconds"] >= 0 for r in setup)

    summary = records[-1]
    assert summary["kind"] == "summary" and summary["images"] == counts[1]
    for row in ROWS:  # medians at the larger count; growth of the median first batch
        r, small = measured[(row, counts[1])], measured[(row, counts[0])]
        assert summary["images_per_sec"][row] == r["images_per_sec"]
        assert summary["first_batch_growth"][row] == pytest.approx(
            r["first_batch_s"] / small["first_batch_s"], abs=0.01)
    assert set(summary["targets"]) == {"c_over_a", "c_over_b", "c_first_batch_growth"}
    for target in summary["targets"].values():
        assert target["value"] > 0 and isinstance(target["pass"], bool)
    assert summary["all_pass"] == all(t["pass"] for t in summary["targets"].values())
