"""The augmentation benchmark runs at its quick size and prints, per setting, every
pipeline's median images/s within its spread and each ratio as the ratio of the medians
(the batched side's timing includes making its canvases from the same decoded images)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINES = ["a_reference_v1_pil", "b_multicrop_v2", "c_batched_cpu", "canvas"]


@pytest.mark.integration  # a whole benchmark program, in its smallest mode
@pytest.mark.budget(45)
def test_augment_benchmark_prints_medians_spreads_and_ratios():
    out = subprocess.run([sys.executable, "bench/augment.py", "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    for setting, crops in (("paper", 12), ("small", 6)):
        rows = {r["pipeline"]: r for r in records if r["setting"] == setting}
        assert list(rows) == PIPELINES
        images = {r["images"] for r in rows.values()}
        assert len(images) == 1  # every pipeline works through the same images
        base = rows["a_reference_v1_pil"]
        for name, r in rows.items():
            assert r["threads"] == 1 and r["reps"] == 3
            low, high = r["images_per_s_spread"]
            assert 0 < low <= r["images_per_s"] <= high
            per_image = crops if name != "canvas" else 1
            assert r["crops_per_s"] == pytest.approx(r["images_per_s"] * per_image, rel=0.01)
            if name == "canvas":
                assert "ratio_to_a" not in r  # makes no crops: no ratio
                continue
            assert r["ratio_to_a"] == pytest.approx(r["images_per_s"] / base["images_per_s"],
                                                    rel=0.02, abs=0.01)
            low, high = r["ratio_to_a_spread"]
            assert 0 < low <= high
        assert base["ratio_to_a"] == 1.0 and base["ratio_to_a_spread"] == [1.0, 1.0]
