"""The Ray overhead benchmark runs at its quick setting: the same step loop in a plain
process and in a one-worker Ray Train group, taking turns, each side printed as median and
spread of its windows and the ratio as the ratio of the medians.

It starts a local Ray (about 10-20 s on 2 cores, with the dashboard that Ray Train's
controller polls) and two Ray Train runs (a controller and a worker process each, several
seconds), which is why its budget is above the default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.budget(180)
def test_ray_overhead_benchmark_runs_both_sides_in_turns(ray_tmp):
    out = subprocess.run([sys.executable, "bench/ray_overhead.py", "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert row["bench"] == "ray_overhead" and row["rounds"] == 2 and row["batch"] == 8
    for side in ("plain", "ray"):
        for key in (f"{side}_img_per_s", f"{side}_run_s"):
            low, high = row[f"{key}_spread"]
            assert 0 < low <= row[key] <= high, (key, row)
    assert row["ratio"] == pytest.approx(row["ray_img_per_s"] / row["plain_img_per_s"],
                                         rel=0.01)
    low, high = row["ratio_spread"]
    assert 0 < low <= high
