"""The code base stays lint-clean (ruff is configured in pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install -e .[dev])")
@pytest.mark.budget(30)
def test_ruff_check_is_clean():
    out = subprocess.run(["ruff", "check", "dino_core", "service", "tests", "bench", "hubconf.py"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy not installed (pip install -e .[dev])")
@pytest.mark.budget(90)
def test_mypy_on_dino_core_is_clean():
    out = subprocess.run(["mypy"], cwd=ROOT, capture_output=True, text=True)  # files: pyproject
    assert out.returncode == 0, out.stdout + out.stderr
