"""The step benchmark runs on CPU at CI size and prints its ratios; compiled backbones keep
their parameter names and compute what the eager ones compute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from dino_core.models import build_backbone, compile_backbone

REPO = Path(__file__).resolve().parents[1]


def test_step_benchmark_prints_every_lever_with_ratios_and_numerics():
    out = subprocess.run(
        [sys.executable, "bench/step.py", "--setting", "small", "--batch", "8", "--steps", "1",
         "--warmup", "1", "--check", "--e2e", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    steps = {r["variant"]: r for r in records if r.get("bench") == "step"}
    # the CPU ladder has no bf16 rung (fp32 is the CPU default)
    assert list(steps) == ["reference", "+sdpa", "+fused_adamw", "+foreach", "+dino_loss",
                           "+no_sync", "dino_core"]
    assert steps["reference"]["ratio"] == 1.0
    for r in steps.values():
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["tflops"] > 0 and r["ratio"] > 0
        assert abs(r["ratio"] - r["img_per_s"] / steps["reference"]["img_per_s"]) < 0.01
    checks = {r["check"]: r for r in records if "check" in r}
    assert set(checks) == {"fp32_reference_vs_ours", "bf16_fast_vs_fp32_plain"}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["fp32_reference_vs_ours"]["loss_rel_diff"] < 1e-5
    (e2e,) = [r for r in records if r.get("bench") == "e2e"]
    assert e2e["img_per_s"] > 0 and e2e["ratio_vs_synthetic"] > 0


def test_compiled_vit_keeps_names_and_matches_eager(one_torch_thread):
    torch.manual_seed(0)
    eager = build_backbone("vit_tiny", 8, 16, drop_path_rate=0.0, depth=2)
    compiled = build_backbone("vit_tiny", 8, 16, drop_path_rate=0.0, depth=2)
    compiled.load_state_dict(eager.state_dict())
    names = list(compiled.state_dict())
    compile_backbone(compiled)
    assert list(compiled.state_dict()) == names
    for size in (16, 8):  # the two crop sizes of a multi-crop step
        x = torch.randn(3, 3, size, size)
        a, b = eager(x), compiled(x)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        a.square().sum().backward()
        b.square().sum().backward()
    # fused kernels sum in another order: fp32 rounding, not a different gradient
    ga = torch.cat([p.grad.flatten() for p in eager.parameters()])
    gb = torch.cat([p.grad.flatten() for p in compiled.parameters()])
    assert float((ga - gb).norm() / ga.norm()) < 1e-4  # measured: 6e-6
