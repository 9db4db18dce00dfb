"""Export of the backbones of checkpoints, run folders and reference files, and what an
evaluation reads of a checkpoint (its config, its step). Reading a backbone is
``service.models.backbones``'s (training reads teachers through it too); its names stay
importable from here, where every evaluation has imported them."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from dino_core.interop.export import backbone_state_from_checkpoint, save_backbone
from dino_core.interop.reference import read_reference
from service import storage
from service.config import DinoConfig
from service.config.specs import run_metadata
from service.errors import CheckpointError
from service.models.backbones import (
    BACKBONE_FILES,
    WEIGHTS,
    fetch_file,
    file_config,
    interpolation,
    load_backbone,
    safetensors_metadata,
)
from service.storage import checkpoints as ckpt

__all__ = [
    "BACKBONE_FILES",
    "WEIGHTS",
    "check_out",
    "checkpoint_config",
    "checkpoint_step",
    "export_backbone",
    "fetch_file",
    "file_config",
    "interpolation",
    "load_backbone",
    "put_file",
    "safetensors_metadata",
]


def check_out(out: str, example: str = "backbone.safetensors") -> None:
    """A local ``--out`` must be a file path in an existing folder."""
    path = Path(out.removeprefix("file://"))
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file path, e.g. "
                         f"{path / example}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {path.parent} does not exist")


def export_backbone(checkpoint_uri: str, out: str, which: str = "teacher") -> str:
    """Writes the ``which`` backbone of a checkpoint (directory, run folder or a reference
    DINO ``.pth``) as a safetensors file (``dino_core.interop.export``), locally or to a URL."""
    if storage.is_local(out):
        check_out(out)
    if checkpoint_uri.endswith(".pth"):
        ref = read_reference(fetch_file(checkpoint_uri))
        if which not in ref.backbones:
            raise ValueError(f"{checkpoint_uri} holds the {' and '.join(ref.backbones)} "
                             f"backbone, not {which!r}")
        weights = ref.backbones[which]
        meta, extra = {**ref.meta, "pos_embed_interpolation": "reference"}, None
    else:
        _, state = ckpt.load(checkpoint_uri)
        weights = backbone_state_from_checkpoint(state, which)
        cfg = DinoConfig.model_validate(state["config"]) if "config" in state else None
        extra = run_metadata(cfg) if cfg else None
        meta = {**state["backbone_meta"], "pos_embed_interpolation": interpolation(state)}
    return put_file(out, "backbone.safetensors",
                    lambda path: save_backbone(path, weights, meta, extra))


def put_file(out: str, name: str, write: Callable[[str], object]) -> str:
    """``write(path)`` to the local ``out``, or to a temporary file uploaded to ``out``."""
    if storage.is_local(out):
        write(out.removeprefix("file://"))
        return out
    with tempfile.TemporaryDirectory() as d:
        local = str(Path(d) / name)
        write(local)
        fs, path = storage.get_fs(out)
        storage.with_retries(lambda: fs.put(local, path), f"upload of {out}")
    return out


def checkpoint_config(uri: str) -> DinoConfig | None:
    """The run config saved beside a checkpoint (``config.yaml``) or in an exported file."""
    if uri.endswith(".pth"):
        return None  # a reference file holds none of our settings
    if uri.endswith(".safetensors"):
        return load_backbone(uri)[1]
    return DinoConfig.model_validate(ckpt.read_config(ckpt.resolve(uri)))


def checkpoint_step(uri: str) -> int:
    """Global step of a checkpoint directory (from its manifest); 0 for a backbone file."""
    if uri.endswith(BACKBONE_FILES):
        return 0
    try:
        uri = ckpt.resolve(uri)
        fs, path = storage.get_fs(storage.join(uri, ckpt.MANIFEST))
        return int(json.loads(fs.cat_file(path)).get("global_step") or 0)
    except (OSError, ValueError, CheckpointError):
        return 0
