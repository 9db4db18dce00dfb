"""``bench/gpu_check.sh`` needs a GPU to measure anything, but not to be checked: its bash
parses, and every command it runs names a script, options and step variants that exist.
The script is run with ``python3`` on PATH replaced by a recorder (``timeout`` and ``tee``
stay real), then each recorded command line goes through the script's own argument parser;
its closing summary is run on made-up rows."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"

RECORDER = """#!{python}
import json, os, sys
argv = sys.argv[1:]
stdin = sys.stdin.read() if argv[:1] == ["-"] else None
with open(os.environ["GPU_CHECK_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": argv, "stdin": stdin}}) + "\\n")
"""


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def recorded_commands(tmp_path: Path) -> list[dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(RECORDER.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "commands.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "GPU_CHECK_RECORD": str(record), "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.mark.budget(20)  # run alone, it imports bench/step.py (torch, timm): 5-10 s of it
def test_gpu_check_parses_and_names_only_options_that_exist(tmp_path):
    syntax = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr

    commands = recorded_commands(tmp_path)
    scripts = [c["argv"][0] for c in commands]
    assert scripts == ["bench/step.py"] * 6 + ["bench/augment.py", "-"], scripts
    step, augment = bench_module("step"), bench_module("augment")
    parsed = []
    for c in commands[:-1]:
        parser = step if c["argv"][0] == "bench/step.py" else augment
        try:
            parsed.append(parser.parse_args(c["argv"][1:]))  # exits 2 on an unknown option
        except SystemExit as err:
            pytest.fail(f"gpu_check.sh runs {' '.join(c['argv'])}: refused ({err})")
    for args in parsed[:6]:
        assert args.device == "cuda"
        for names in (args.variants, args.profile):  # every variant is one step.py knows
            if names:
                assert step.variant_names(names) == names.split(",")
    assert parsed[6].device == "cuda" and parsed[6].quick
    assert "dino_core+fp8" in parsed[2].variants and parsed[2].e2e_packed
    # and an unknown variant is refused by name, not silently left out of the ladder
    with pytest.raises(SystemExit) as refused:
        step.parse_args(["--variants", "reference,dino_core+nope,+sdap"])
    assert refused.value.code == 2
    with pytest.raises(ValueError, match=r"dino_core\+nope.*\+sdap"):
        step.variant_names("reference,dino_core+nope,+sdap")

    # the closing summary: exit 0 when every numerics check passed, 1 when one failed
    summary = commands[-1]["stdin"]
    rows = tmp_path / "rows.jsonl"
    for ok, code in ((True, 0), (False, 1)):
        rows.write_text("\n".join(json.dumps(r) for r in (
            {"check": "fp32_reference_vs_ours", "ok": True},
            {"check": "bf16_fast_vs_fp32_plain", "ok": ok},
            {"bench": "step", "variant": "dino_core+fp8", "error": "no torchao"},
            {"bench": "step", "variant": "dino_core", "img_per_s": 1.0})) + "\nnot json\n")
        run = subprocess.run([sys.executable, "-", str(rows)], input=summary,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == code, run.stdout + run.stderr
        assert "4 rows; 2 numerics checks" in run.stdout and "dino_core+fp8" in run.stdout
