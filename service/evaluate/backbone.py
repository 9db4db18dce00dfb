"""Backbones of checkpoints, run folders and exported files, and their export: the storage
layer around ``dino_core.interop.export``."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from dino_core.interop.export import backbone_state_from_checkpoint, read_metadata, save_backbone
from dino_core.interop.export import load_backbone as load_backbone_file
from dino_core.interop.reference import read_reference
from dino_core.models.backbone import build_backbone
from service import storage
from service.config import DinoConfig
from service.config.specs import CONFIG_KEY, run_metadata
from service.errors import CheckpointError
from service.storage import checkpoints as ckpt

WEIGHTS = ("teacher", "student", "random")
BACKBONE_FILES = (".safetensors", ".pth")  # exported by us; the reference DINO code's, Meta's
log = logging.getLogger(__name__)


def load_backbone(uri: str, which: str = "teacher") -> tuple[nn.Module, DinoConfig | None]:
    """The backbone of a checkpoint directory/URL, of a run folder (its newest complete
    checkpoint), of an exported ``.safetensors`` file or of a ``.pth`` file: the reference
    DINO code's (main_dino's ``checkpoint.pth`` or a released backbone file such as
    ``dino_deitsmall16_pretrain.pth``) or Meta's DINOv2 / DINOv3 backbone files
    (``dinov2_vits14_pretrain.pth``, ``dinov3_vits16_pretrain_lvd1689m-*.pth``).

    ``which``: the checkpoint's ``teacher`` or ``student`` (a backbone file holds only the
    former), or ``random``: the same architecture freshly initialised (seeded by the run's
    ``train.seed``, 0 for a file without settings), the baseline a pretrained backbone is
    judged against. The config is None for a reference file and for an exported file without
    the run's settings.
    """
    if which not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {which!r}")
    if uri.endswith(BACKBONE_FILES):
        local = fetch_file(uri)
        cfg = file_config(local, uri) if uri.endswith(".safetensors") else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed if cfg else 0)
            return load_backbone_file(local, which), cfg
    _, state = ckpt.load(uri)
    cfg = DinoConfig.model_validate(state["config"])
    meta = state["backbone_meta"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_backbone(meta["arch"], meta["patch_size"], meta["img_size"],
                               depth=meta["depth"], pos_embed_interpolation=interpolation(state))
    if which != "random":
        model.load_state_dict(backbone_state_from_checkpoint(state, which), strict=True)
    return model.eval(), cfg


def interpolation(state: dict) -> str:
    """The position-table interpolation of a checkpoint's model: its config's, and timm's for
    a checkpoint saved before the option existed (its model resampled timm's way)."""
    model = (state.get("config") or {}).get("model") or {}
    return str(model.get("pos_embed_interpolation", "timm"))


def fetch_file(uri: str) -> str:
    """A local path of a backbone file (a remote one is downloaded to a temporary folder)."""
    local = uri
    if not storage.is_local(uri):
        name = "b" + Path(uri).suffix
        local = str(storage.download_file(uri, Path(tempfile.mkdtemp()) / name))
    local = local.removeprefix("file://")
    if not Path(local).is_file():
        raise FileNotFoundError(f"no backbone file {uri}")
    return local


def safetensors_metadata(local: str, uri: str) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file, read before anything else of it: for random
    bytes or a truncated download the library says only "Error while deserializing header".

    Raises:
        CheckpointError: naming ``uri`` and what the library found.
    """
    try:
        return read_metadata(local)
    except SafetensorError as err:
        raise CheckpointError(f"{uri} is not a readable .safetensors file ({err}): truncated "
                              "or not one at all; export it again with `dino export`") from None


def file_config(local: str, uri: str) -> DinoConfig | None:
    """The run settings an exported file carries (``dino_config``), so that evaluations use
    the run's procedural set and image size; None, with a warning, for a file without them."""
    meta = safetensors_metadata(local, uri)
    if CONFIG_KEY in meta:
        return DinoConfig.model_validate(json.loads(meta[CONFIG_KEY]))
    log.warning("%s holds no run settings (exported before they were stored): the default "
                "procedural set (colourful, difficulty 1, 64 px) and --image-size 224 are used "
                "unless given", uri)
    return None


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
