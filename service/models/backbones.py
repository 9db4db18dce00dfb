"""Backbones of checkpoints, run folders, exported files and the reference's and Meta's
files, read through the service's storage (URLs are downloaded first): the storage layer
around ``dino_core.interop.export``. Evaluations read them (``service.evaluate``) and so does
distillation, whose frozen teacher is one (``service.models.teacher``)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from dino_core.interop.export import backbone_state_from_checkpoint, read_metadata
from dino_core.interop.export import load_backbone as load_backbone_file
from dino_core.models.backbone import build_backbone
from service import storage
from service.config import DinoConfig
from service.config.specs import CONFIG_KEY
from service.errors import CheckpointError, ConfigError
from service.storage import checkpoints as ckpt

WEIGHTS = ("teacher", "student", "random")
DEFAULT_IMAGE_SIZE = 224  # a backbone without run settings: the side DINO's evaluations use
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
    return checkpoint_backbone(state, which)


def eval_image_size(image_size: int | None, cfg: DinoConfig | None, model: nn.Module) -> int:
    """The side of the centre crop that evaluations and embeddings take: ``image_size``, else
    the run's ``eval.image_size`` (the side it was trained for), else 224 (None: the
    default); at least one patch of ``model``.

    Raises:
        ConfigError: the side is not positive, or smaller than one patch.
    """
    if image_size is None:
        image_size = cfg.eval.image_size if cfg is not None else DEFAULT_IMAGE_SIZE
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1))[0]
    if image_size < 1:
        raise ConfigError(f"--image-size must be at least 1, got {image_size}")
    if image_size < patch:
        raise ConfigError(f"--image-size {image_size} is smaller than one patch of the backbone "
                          f"({patch} px); use at least {patch}")
    return image_size


def checkpoint_backbone(state: dict[str, Any], which: str = "teacher") -> tuple[nn.Module, DinoConfig]:
    """The ``which`` backbone of a loaded checkpoint's state (``random``: its architecture,
    seeded by the run's ``train.seed``), in eval mode, and the run's config."""
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
