"""Named presets: small YAML files beside this module (torchtitan-style config registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from service.errors import ConfigError

_DIR = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = _DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(names())}")
    return yaml.safe_load(path.read_text()) or {}
