"""The files a run leaves next to its checkpoints and in its tracker:
``teacher_backbone.safetensors``, the EMA teacher's backbone (a distillation run's: the
student's EMA copy), with the metadata that rebuilds it and the run's resolved config, in the
run's folder (or a folder under it: ``students/<name>/`` for an extra student of
distillation) and the tracker; the run's backbone as an MLflow model (``backbone``); and
``config.yaml``, the resolved config, in the tracker, which also samples the machine's system
metrics while the run trains (``tracked``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from dino_core.interop.export import backbone_state_from_checkpoint, save_backbone
from dino_core.models.backbone import embed_dim_of
from service import storage
from service.config import DinoConfig, backbone_meta, to_yaml
from service.config.specs import run_metadata
from service.tracking import Tracker, log_backbone_model, system_metrics

BACKBONE_FILE = "teacher_backbone.safetensors"
CONFIG_FILE = "config.yaml"  # what `dino train --config` (load_config) reads back


def export_backbone(teacher: nn.Module, cfg: DinoConfig, run_url: str, tracker: Tracker,
                    folder: str = "") -> str:
    """Writes ``teacher``'s backbone to ``<run_url>/<folder>/teacher_backbone.safetensors``
    and the tracker's ``<folder>``; ``cfg``'s ``model.*`` builds it back. The run's own
    backbone (no ``folder``) also becomes the tracker's model ``backbone``, registered as
    ``train.register_model`` if set. Returns the URL."""
    url = storage.join(run_url, folder, BACKBONE_FILE) if folder else storage.join(
        run_url, BACKBONE_FILE)
    with tempfile.TemporaryDirectory(prefix="dino-export-") as d:
        path = os.path.join(d, BACKBONE_FILE)
        weights = backbone_state_from_checkpoint({"teacher": teacher.state_dict()})
        save_backbone(path, weights, backbone_meta(cfg), run_metadata(cfg))
        storage.makedirs(url.rsplit("/", 1)[0])
        # retried through an outage; kept on local disk (and named) if storage never returns
        storage.upload_file(path, url)
        tracker.log_artifact(path, folder or None)
        if not folder:
            log_backbone_model(tracker, path, embed_dim_of(teacher.backbone),
                               model_metadata(cfg), cfg.train.register_model)
    return url


def model_metadata(cfg: DinoConfig) -> dict[str, str]:
    """What the MLflow model's MLmodel file says about its input and output."""
    e, m = cfg.eval, cfg.model
    return {"run_name": cfg.run_name, "arch": m.arch, "patch_size": str(m.patch_size),
            "image_size": str(e.image_size),
            "input": f"float32 (N, 3, H, W): RGB in [0, 1] normalised with ImageNet's mean and "
                     f"std; the run's k-NN used H = W = {e.image_size} (resize of the shorter "
                     f"side to {int(e.image_size * 256 / 224)}, centre crop)",
            "output": "float32 (N, D): the l2-normalised CLS features of the k-NN evaluation"}


def export_config(cfg: DinoConfig, tracker: Tracker) -> None:
    """Logs the resolved config as the tracker's ``config.yaml`` (the same text every
    checkpoint holds), which ``load_config(file=...)`` reads back to the same config."""
    with tempfile.TemporaryDirectory(prefix="dino-config-") as d:
        path = os.path.join(d, CONFIG_FILE)
        with open(path, "w") as f:
            f.write(to_yaml(cfg))
        tracker.log_artifact(path)


@contextmanager
def tracked(cfg: DinoConfig, tracker: Tracker) -> Iterator[None]:
    """Around a rank's training: ``export_config``, then the machine's system metrics while
    the block runs (``tracking.system_metrics``; rank 0's tracker: the others track none)."""
    export_config(cfg, tracker)
    t = cfg.tracking
    with system_metrics(tracker, t.system_metrics, t.system_metrics_interval_s):
        yield
