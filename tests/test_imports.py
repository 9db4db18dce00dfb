"""dino_core stays pure PyTorch."""

import subprocess
import sys

import pytest

FORBIDDEN = ("ray", "mlflow", "fsspec", "s3fs", "boto3", "botocore", "gcsfs")


@pytest.mark.budget(25)
def test_dino_core_imports_no_service_dependencies():
    code = (
        "import sys, dino_core, dino_core.data, dino_core.eval, dino_core.augment.per_image;"
        "import pkgutil, importlib;"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(dino_core.__path__, 'dino_core.')];"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"dino_core pulled in: {out.stdout.strip()}"


@pytest.mark.budget(25)
def test_dino_core_names_load_lazily_and_config_needs_no_torch():
    code = (
        "import sys, service.config, dino_core;"
        "print('torch' in sys.modules);"
        "missing = [n for n in dino_core.__all__ if getattr(dino_core, n, None) is None];"
        "print(missing, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False", "[] True"], out.stdout + out.stderr
