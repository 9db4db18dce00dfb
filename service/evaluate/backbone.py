"""Backbones of checkpoints, run folders and exported files, and their export: the storage
layer around ``dino_core.export``."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from dino_core.export import backbone_state_from_checkpoint, read_metadata, save_backbone
from dino_core.export import load_backbone as load_backbone_file
from dino_core.models.backbone import build_backbone
from service import storage
from service.config import DinoConfig
from service.config.specs import CONFIG_KEY, run_metadata
from service.errors import CheckpointError
from service.storage import checkpoints as ckpt

WEIGHTS = ("teacher", "student", "random")
log = logging.getLogger(__name__)


def load_backbone(uri: str, which: str = "teacher") -> tuple[nn.Module, DinoConfig | None]:
    """The backbone of a checkpoint directory/URL, of a run folder (its newest complete
    checkpoint) or of an exported ``.safetensors`` file.

    ``which``: the checkpoint's ``teacher`` or ``student``, or ``random``: the same
    architecture freshly initialised (seeded by the run's ``train.seed``), the baseline a
    pretrained backbone is judged against.
    """
    if which not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {which!r}")
    if uri.endswith(".safetensors"):
        if which != "teacher":
            raise ValueError(f"an exported backbone holds only its own weights, not {which!r}")
        local = uri
        if not storage.is_local(uri):
            local = str(storage.download_file(uri, Path(tempfile.mkdtemp()) / "b.safetensors"))
        local = local.removeprefix("file://")
        if not Path(local).is_file():
            raise FileNotFoundError(f"no backbone file {uri}")
        return load_backbone_file(local), file_config(local, uri)
    _, state = ckpt.load(uri)
    cfg = DinoConfig.model_validate(state["config"])
    meta = state["backbone_meta"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_backbone(meta["arch"], meta["patch_size"], meta["img_size"],
                               depth=meta["depth"])
    if which != "random":
        model.load_state_dict(backbone_state_from_checkpoint(state, which), strict=True)
    return model.eval(), cfg


def file_config(local: str, uri: str) -> DinoConfig | None:
    """The run settings an exported file carries (``dino_config``), so that evaluations use
    the run's procedural set and image size; None, with a warning, for a file without them."""
    meta = read_metadata(local)
    if CONFIG_KEY in meta:
        return DinoConfig.model_validate(json.loads(meta[CONFIG_KEY]))
    log.warning("%s holds no run settings (exported before they were stored): the default "
                "procedural set (colourful, difficulty 1, 64 px) and --image-size 224 are used "
                "unless given", uri)
    return None


def _check_out(out: str) -> None:
    """A local ``--out`` must be a file path in an existing folder."""
    path = Path(out.removeprefix("file://"))
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file path, e.g. "
                         f"{path / 'backbone.safetensors'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {path.parent} does not exist")


def export_backbone(checkpoint_uri: str, out: str, which: str = "teacher") -> str:
    if storage.is_local(out):
        _check_out(out)
    _, state = ckpt.load(checkpoint_uri)
    weights = backbone_state_from_checkpoint(state, which)
    extra = run_metadata(DinoConfig.model_validate(state["config"])) if "config" in state else None
    if storage.is_local(out):
        save_backbone(out.removeprefix("file://"), weights, state["backbone_meta"], extra)
        return out
    with tempfile.TemporaryDirectory() as d:
        local = save_backbone(Path(d) / "backbone.safetensors", weights, state["backbone_meta"],
                              extra)
        fs, path = storage.get_fs(out)
        storage.with_retries(lambda: fs.put(str(local), path), f"upload of {out}")
    return out


def checkpoint_config(uri: str) -> DinoConfig | None:
    """The run config saved beside a checkpoint (``config.yaml``) or in an exported file."""
    if uri.endswith(".safetensors"):
        return load_backbone(uri)[1]
    return DinoConfig.model_validate(ckpt.read_config(ckpt.resolve(uri)))


def checkpoint_step(uri: str) -> int:
    """Global step of a checkpoint directory (from its manifest); 0 for a backbone file."""
    if uri.endswith(".safetensors"):
        return 0
    try:
        uri = ckpt.resolve(uri)
        fs, path = storage.get_fs(storage.join(uri, ckpt.MANIFEST))
        return int(json.loads(fs.cat_file(path)).get("global_step") or 0)
    except (OSError, ValueError, CheckpointError):
        return 0
