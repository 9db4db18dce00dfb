"""Video object segmentation of a checkpoint's backbone: the paper's DAVIS 2017 protocol
(label propagation of the first frame's masks, scored by J&F) on a local DAVIS folder or on
the built-in procedural videos; the file layer around ``dino_core.eval.video``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino_core.data.davis import DavisVideos, write_masks
from dino_core.data.video import ProceduralVideos
from dino_core.eval.video import (
    frame_size,
    grid_round_trip,
    prepare_frame,
    segment_video,
    vit_frame_features,
)
from dino_core.eval.video_metrics import summarize, video_scores
from dino_core.models.backbone import is_vit
from service import storage
from service.evaluate.backbone import load_backbone

log = logging.getLogger(__name__)


def video_set(data: str, split: str = "val", videos: int = 4, frames: int = 12,
              frame_side: int = 96, seed: int = 0) -> ProceduralVideos | DavisVideos:
    """``procedural`` (``videos`` x ``frames`` frames of ``frame_side`` px, from ``seed``) or
    the ``split`` of a local DAVIS 2017 folder.

    Raises:
        ValueError: a remote URL (only local DAVIS folders are read).
        FileNotFoundError: the folder lacks the split list or a video's frames.
    """
    if data == "procedural":
        return ProceduralVideos(videos, frames, frame_side, seed=seed)
    if not storage.is_local(data):
        raise ValueError(f"--data {data}: only a local DAVIS folder or 'procedural' is read; "
                         f"copy the folder here first")
    root = Path(data.removeprefix("file://"))
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder (give a DAVIS 2017 root, the "
                                f"folder holding JPEGImages/ and Annotations/, or 'procedural')")
    return DavisVideos(root, split)


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def video_eval(checkpoint: str, data: str = "procedural", which: str = "teacher",
               split: str = "val", image_size: int | None = None, n_last_frames: int = 7,
               topk: int = 5, neighborhood: int = 12, output_dir: str | None = None,
               videos: int = 4, frames: int = 12, frame_side: int = 96, seed: int = 0,
               device: str | None = None) -> dict[str, Any]:
    """J&F of label propagation with the backbone's last-block patch features.

    Args:
        checkpoint: checkpoint dir/URL, run folder or exported backbone file.
        data: ``procedural`` or a local DAVIS 2017 root.
        image_size: the shorter side the frames are resized to (None: as they are, 480 for
            DAVIS's 480p frames as in the reference); both sides are rounded down to whole
            patches.
        n_last_frames, topk, neighborhood: the propagation's context (paper: 7, 5, 12).
        output_dir: if set, the predicted masks as palette PNGs, ``<dir>/<video>/00000.png``
            (the DAVIS toolkit's results layout).
        videos, frames, frame_side, seed: the procedural set's size.

    Returns:
        ``jf``, ``j``, ``f`` (means over all objects, percent), ``grid_round_trip`` (the
        same for the true masks sent through the patch grid and back: what the grid's
        resolution alone costs, roughly the best propagation reaches at this input size),
        ``per_video`` (J and F per video), ``n_videos``, ``n_objects``, ``patch_size``,
        ``input_size`` (of the first video), the propagation parameters and ``output_dir``.

    Raises:
        ValueError: a backbone without patch tokens (ResNet-50), or bad parameters.
    """
    if topk < 1 or n_last_frames < 0:
        raise ValueError(f"--topk must be >= 1 and --n-last-frames >= 0, got {topk} and "
                         f"{n_last_frames}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be positive, got {image_size}")
    dataset = video_set(data, split, videos, frames, frame_side, seed)
    model, _ = load_backbone(checkpoint, which)
    if not is_vit(model):
        raise ValueError(f"video segmentation propagates labels between ViT patch tokens; "
                         f"{checkpoint} holds a {type(model).__name__}, which has none")
    dev = _device(device)
    model = model.to(dev).eval()
    patch = int(model.patch_embed.patch_size[0])
    features = vit_frame_features(model)
    per_video: dict[str, dict[str, float]] = {}
    scores, round_trips, input_size = [], [], None
    for index in range(len(dataset)):
        video = dataset[index]
        size = frame_size(*video.frames.shape[1:3], image_size, patch)
        input_size = input_size or list(size)
        prepared = [prepare_frame(f, size).to(dev) for f in video.frames]
        pred = segment_video(features, prepared, video.masks[0], patch, n_last_frames, topk,
                             neighborhood)
        score = video_scores(video.masks, pred)
        scores.append(score)
        grid = (size[0] // patch, size[1] // patch)
        round_trips.append(video_scores(video.masks, np.stack(
            [grid_round_trip(m, grid, patch) for m in video.masks])))
        per_video[video.name] = {"j": 100 * float(np.mean(score["j"] or [np.nan])),
                                 "f": 100 * float(np.mean(score["f"] or [np.nan])),
                                 "n_objects": len(score["j"])}
        if output_dir:
            write_masks(Path(output_dir) / video.name, pred)
        log.info("video %s: J %.1f F %.1f", video.name, per_video[video.name]["j"],
                 per_video[video.name]["f"])
    summary = summarize(scores)
    trip = summarize(round_trips)
    return {**summary, "grid_round_trip": {k: trip[k] for k in ("jf", "j", "f")},
            "per_video": per_video, "n_videos": len(per_video),
            "patch_size": patch, "input_size": input_size, "n_last_frames": n_last_frames,
            "topk": topk, "neighborhood": neighborhood, "data": data,
            "output_dir": output_dir}
