"""The one way the API reads a run's settings: a preset and/or a config (a YAML file, a
mapping of sections or a ``DinoConfig``), then overrides (``"key=value"`` strings as on the
command line, or a ``{"dotted.key": value}`` mapping), validated as ``dino`` validates them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from service.config import DinoConfig, load_config
from service.errors import ConfigError

Config = str | os.PathLike[str] | Mapping[str, Any] | DinoConfig | None
Overrides = Iterable[str] | Mapping[str, Any] | None


def override_items(overrides: Overrides) -> list[str]:
    """``["optim.lr=1e-3"]`` as given; a mapping's values written as JSON (which YAML reads
    back as the same value: ``{"run_name": "007"}`` stays the string "007")."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: a list of key=value strings or a mapping, got the "
                          f"string {overrides!r}")
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    items = list(overrides)
    bad = [i for i in items if not isinstance(i, str)]
    if bad:
        raise ConfigError(f"overrides: each one a key=value string, got {bad[0]!r}")
    return items


def resolve(preset: str | None = None, config: Config = None,
            overrides: Overrides = None) -> DinoConfig:
    """The validated config; ConfigError naming the problem otherwise."""
    items = override_items(overrides)
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(preset, os.fspath(config) if config is not None else None, items)
    if isinstance(config, DinoConfig):
        # what was set, so the rules for unset keys (a fresh run name) still apply
        config = config.model_dump(mode="json", exclude_unset=True)
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: a YAML file's path, a mapping of sections or a "
                          f"DinoConfig, got {type(config).__name__}")
    return load_config(preset, None, items, sections=config)
