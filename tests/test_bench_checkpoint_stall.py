"""The checkpoint-stall benchmark runs at its quick size against real services (moto's S3
server, a local Ray with one Ray Train worker): cycles without a checkpoint, with a
synchronous and with a background upload take turns, every cycle made of real training
steps, and the stall of each checkpoint is its cycle's extra time over the median cycle
without one. The figures are not asserted (2 busy shared cores), only how they are made.

It starts moto and a local Ray with its dashboard (10-20 s on 2 cores) and a Ray Train run,
hence its budget."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.budget(150)
def test_checkpoint_stall_benchmark_measures_steps_around_checkpoints(ray_tmp):
    out = subprocess.run([sys.executable, "bench/checkpoint_stall.py", "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    cycles, summary = records[:-1], records[-1]
    # 2 rounds of the three kinds, the first kind rotating
    assert [c["mode"] for c in cycles] == ["none", "sync", "background",
                                           "sync", "background", "none"]
    none = [c["cycle_s"] for c in cycles if c["mode"] == "none"]
    for c in cycles:
        assert c["steps"] == 3 and c["steps_s"] > 0 and c["drain_s"] >= 0
        assert c["cycle_s"] >= c["call_s"] + c["steps_s"] + c["drain_s"] - 0.01
        assert c["stall_s"] == pytest.approx(c["cycle_s"] - statistics.median(none), abs=2e-3)
        if c["mode"] == "none":
            assert c["write_s"] == c["call_s"] == 0.0
        else:
            assert 0 < c["write_s"] <= c["call_s"]
    assert summary["summary"] == "checkpoint stall" and summary["rounds"] == 2
    for mode in ("sync", "background"):
        stalls = [c["stall_s"] for c in cycles if c["mode"] == mode]
        assert summary[f"{mode}_stall_s"] == pytest.approx(statistics.median(stalls), abs=2e-3)
        assert summary[f"{mode}_stall_s_spread"] == [min(stalls), max(stalls)]
    ratio = summary["ratio_background_over_sync"]
    if summary["sync_stall_s"] > 0:
        assert ratio == pytest.approx(summary["background_stall_s"] / summary["sync_stall_s"],
                                      abs=2e-3)
        assert summary["met"] == (ratio <= summary["target"])
    else:  # a stall within the noise of the cycles without one has no ratio
        assert ratio is None and summary["met"] is None
