"""The backbone files a run leaves next to its checkpoints: ``teacher_backbone.safetensors``,
the EMA teacher's backbone (a distillation run's: the student's EMA copy), with the
metadata that rebuilds it and the run's resolved config, in the run's folder (or a folder
under it: ``students/<name>/`` for an extra student of distillation) and the tracker.
"""

from __future__ import annotations

import os
import tempfile

from torch import nn

from dino_core.interop.export import backbone_state_from_checkpoint, save_backbone
from service import storage
from service.config import DinoConfig, backbone_meta
from service.config.specs import run_metadata
from service.tracking import Tracker

BACKBONE_FILE = "teacher_backbone.safetensors"


def export_backbone(teacher: nn.Module, cfg: DinoConfig, run_url: str, tracker: Tracker,
                    folder: str = "") -> str:
    """Writes ``teacher``'s backbone to ``<run_url>/<folder>/teacher_backbone.safetensors``
    and the tracker's ``<folder>``; ``cfg``'s ``model.*`` builds it back. Returns the URL."""
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
    return url
