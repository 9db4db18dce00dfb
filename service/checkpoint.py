"""Checkpoint directories: write, then commit; verify on load; fall back if damaged.

A checkpoint is a directory with ``state.pt`` (everything needed to continue exactly),
``config.yaml`` (the resolved config) and ``manifest.json`` (size and SHA-256 of each file,
epoch and step). The manifest is written last, so a directory without one was never finished
and is never loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from service import storage

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STATE = "state.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """The checkpoint is missing, incomplete or damaged."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checkpoint(directory: str | Path, state: dict[str, Any], config_yaml: str) -> Path:
    """Writes ``state`` and the config, then the manifest that commits them."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / STATE)
    (d / "config.yaml").write_text(config_yaml)
    files = {
        name: {"size": (d / name).stat().st_size, "sha256": _sha256(d / name)}
        for name in (STATE, "config.yaml")
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "epoch": state.get("epoch"),
        "global_step": state.get("global_step"),
        "files": files,
    }
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.rename(d / MANIFEST)
    return d


def verify(directory: str | Path) -> dict[str, Any]:
    """Checks the manifest against the files; returns the manifest."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    if not (d / MANIFEST).is_file():
        raise CheckpointError(f"{d}: no {MANIFEST} (the checkpoint was never completed)")
    manifest = json.loads((d / MANIFEST).read_text())
    for name, rec in manifest["files"].items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{d}: {name} is missing")
        if f.stat().st_size != rec["size"]:
            raise CheckpointError(
                f"{d}: {name} has {f.stat().st_size} bytes, the manifest says {rec['size']}"
            )
        if _sha256(f) != rec["sha256"]:
            raise CheckpointError(f"{d}: {name} does not match its SHA-256")
    return manifest


def load_checkpoint(uri: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a verified checkpoint from a local directory or a storage URL."""
    local = storage.download_dir(str(uri))
    verify(local)
    with open(local / STATE, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=False)


def load_latest_valid(
    candidates: list[str], map_location: str | torch.device = "cpu"
) -> tuple[str, dict[str, Any]] | None:
    """Loads the newest loadable checkpoint of ``candidates`` (oldest first), warning about
    each damaged one it skips."""
    for uri in reversed(candidates):
        try:
            return uri, load_checkpoint(uri, map_location)
        except (CheckpointError, storage.StorageError, EOFError, RuntimeError) as err:
            log.warning("skipping damaged checkpoint %s: %s", uri, err)
    return None


def checkpoint_dirs(run_url: str) -> list[str]:
    """``checkpoint_*`` directories of a Ray Train run, oldest first (names sort by time)."""
    return [u for u in storage.list_dirs(run_url) if u.rstrip("/").split("/")[-1].startswith("checkpoint_")]


def kept_locally(storage_url: str) -> list[tuple[Path, dict[str, Any] | None]]:
    """Checkpoint directories under ``storage_url`` that never reached storage and are kept in
    this machine's spool (see ``service.storage``), each with its manifest (None if the copy is
    incomplete), oldest first."""
    _, path = storage.get_fs(storage_url)
    base = storage.spool_dir() / "kept" / path.lstrip("/")
    out: list[tuple[Path, dict[str, Any] | None]] = []
    for d in sorted(p.parent for p in base.rglob("*") if p.is_file()) if base.is_dir() else []:
        if d.name.startswith("checkpoint_") and all(d != o for o, _ in out):
            try:
                out.append((d, verify(d)))
            except (CheckpointError, OSError, ValueError):
                out.append((d, None))
    return out
