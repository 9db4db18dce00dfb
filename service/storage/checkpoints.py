"""Checkpoint directories: write, then commit; verify on load; fall back if damaged.

A checkpoint is a directory with ``state.pt`` (everything needed to continue exactly),
``config.yaml`` (the resolved config) and ``manifest.json`` (size and SHA-256 of each file,
epoch and step; a distillation run's teacher URI and hash). The manifest is written last, so a directory without one was never finished
and is never loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.errors import CheckpointError, StorageError
from service.storage import fs as storage
from service.storage.retry import spool_dir, with_retries

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STATE = "state.pt"
CHECKPOINT_PREFIX = "checkpoint_"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
FORMAT_VERSION = 1


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
    if state.get("distill"):  # the frozen teacher's URI and hash, read before Ray on a resume
        manifest["distill"] = {k: state["distill"][k] for k in ("teacher_uri", "teacher_sha256")}
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


# what a state.pt holds besides tensors and plain containers: numpy's RNG state
# (np.random.get_state(), a uint32 array); nothing else is ever built from one
_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2 / 1
STATE_GLOBALS = [_NP_CORE.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of the checkpoint directory ``uri`` (local or a URL), nothing else read;
    {} when it has none."""
    raw = _read(storage.join(str(uri), MANIFEST))
    return json.loads(raw) if raw else {}


def load_checkpoint(uri: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a verified checkpoint from a local directory or a storage URL. The manifest
    proves the files whole, not who wrote them (it sits in the same storage), so the state is
    read with ``weights_only=True``: a pickle holding anything but tensors, plain containers
    and numpy's RNG state is refused before any of it is built."""
    local = storage.download_dir(str(uri))
    verify(local)
    with open(local / STATE, "rb") as f:
        blob = io.BytesIO(f.read())
    try:
        with torch.serialization.safe_globals(STATE_GLOBALS):
            return torch.load(blob, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"a pickled {found.group(1)}" if found else "something else"
        raise CheckpointError(f"{storage.join(str(uri), STATE)}: refused: it holds {what}, which no "
                              "checkpoint of dino holds; nothing of it was run") from None


def load_latest_valid(
    candidates: list[str], map_location: str | torch.device = "cpu"
) -> tuple[str, dict[str, Any]] | None:
    """Loads the newest loadable checkpoint of ``candidates`` (oldest first), warning about
    each damaged one it skips."""
    for uri in reversed(candidates):
        try:
            return uri, load_checkpoint(uri, map_location)
        except (CheckpointError, StorageError, EOFError, RuntimeError) as err:
            log.warning("skipping damaged checkpoint %s: %s", uri, err)
    return None


def checkpoint_dirs(run_url: str) -> list[str]:
    """``checkpoint_*`` directories of a run, oldest first (names sort by time). Only
    directories: Ray's ``checkpoint_manager_snapshot.json`` beside them is no checkpoint."""
    return [u for u in storage.list_dirs(run_url)
            if u.rstrip("/").split("/")[-1].startswith(CHECKPOINT_PREFIX)]


def _read(url: str) -> bytes | None:
    """The bytes of the file at ``url``, None if there is none (retried through outages)."""
    fs, path = storage.get_fs(url)
    try:
        return with_retries(lambda: fs.cat_file(path), f"read of {url}", url=url)
    except StorageError as err:
        if isinstance(err.__cause__, FileNotFoundError | IsADirectoryError):
            return None
        raise


def is_checkpoint(uri: str) -> bool:
    """Whether ``uri`` is a checkpoint directory (it has a manifest; complete or not)."""
    fs, path = storage.get_fs(storage.join(uri, MANIFEST))
    return bool(fs.exists(path))


def committed(run_url: str) -> list[str]:
    """The run's ``checkpoint_*`` directories whose manifest was written, oldest first (one
    existence check each; the files are verified when a checkpoint is loaded)."""
    return [c for c in checkpoint_dirs(run_url) if is_checkpoint(c)]


def _target(uri: str) -> tuple[str, list[str]]:
    """``(uri, [])`` for a checkpoint directory, ``(uri, committed checkpoints)`` for a run
    folder; raises CheckpointError naming what ``uri`` is instead."""
    uri = str(uri).rstrip("/")
    name = uri.split("/")[-1]
    if name == RAY_SNAPSHOT:
        raise CheckpointError(
            f"{uri} is Ray's record of the run, not a checkpoint; give the run folder "
            f"({uri.rsplit('/', 1)[0]}) or one of its {CHECKPOINT_PREFIX}* directories")
    fs, path = storage.get_fs(uri)
    if not fs.exists(path):
        raise CheckpointError(f"{uri}: no such checkpoint or run folder")
    if not fs.isdir(path):
        raise CheckpointError(f"{uri} is a file, not a checkpoint directory or run folder")
    if is_checkpoint(uri):
        return uri, []
    found = committed(uri)
    if found:
        return uri, found
    if dirs := checkpoint_dirs(uri):  # listed again on this error path only
        raise CheckpointError(f"{uri}: none of its {len(dirs)} checkpoints is complete")
    raise CheckpointError(f"{uri} holds no checkpoint: no {MANIFEST} (a checkpoint that was "
                          f"never completed) and no {CHECKPOINT_PREFIX}* directories (a run "
                          f"folder)")


def resolve(uri: str) -> str:
    """The checkpoint meant by ``uri``: a checkpoint directory as it is, or the newest
    committed checkpoint of a run folder (``<storage.root>/<run_name>``, local or URL).

    Raises:
        CheckpointError: ``uri`` is Ray's snapshot file, or neither a checkpoint nor a run
            folder with a committed checkpoint; the message says which.
    """
    uri, found = _target(uri)
    return found[-1] if found else uri


def load(uri: str, map_location: str | torch.device = "cpu") -> tuple[str, dict[str, Any]]:
    """``(checkpoint, state)`` of ``uri`` as ``resolve`` reads it; of a run folder, the newest
    checkpoint that verifies (damaged ones are skipped with a warning). Each candidate is
    downloaded and verified once, by ``load_checkpoint``."""
    uri, found = _target(uri)
    if not found:
        return uri, load_checkpoint(uri, map_location)
    loaded = load_latest_valid(found, map_location)
    if loaded is None:
        raise CheckpointError(f"{uri}: none of its {len(found)} checkpoints verifies")
    return loaded


def kept_locally(storage_url: str) -> list[tuple[Path, dict[str, Any] | None]]:
    """Checkpoint directories under ``storage_url`` that never reached storage and are kept in
    this machine's spool (see ``service.storage``), each with its manifest (None if the copy is
    incomplete), oldest first."""
    _, path = storage.get_fs(storage_url)
    base = spool_dir() / "kept" / path.lstrip("/")
    out: list[tuple[Path, dict[str, Any] | None]] = []
    for d in sorted(p.parent for p in base.rglob("*") if p.is_file()) if base.is_dir() else []:
        if d.name.startswith("checkpoint_") and all(d != o for o, _ in out):
            try:
                out.append((d, verify(d)))
            except (CheckpointError, OSError, ValueError):
                out.append((d, None))
    return out


def read_config(uri: str) -> dict[str, Any]:
    """The resolved config saved in the checkpoint ``uri`` (its ``config.yaml``), as data."""
    import yaml

    blob = _read(storage.join(uri, "config.yaml"))
    if blob is None:
        raise CheckpointError(f"{uri}: no config.yaml")
    return yaml.safe_load(blob) or {}
