"""Linear probe of a frozen backbone (``dino_core.eval.linear``) on labeled splits."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dino_core.eval.linear import linear_train_transform, train_linear
from service import data, storage
from service.evaluate.backbone import load_backbone
from service.evaluate.knn import labeled_split
from service.evaluate.settings import describe, eval_settings
from service.models.backbones import eval_image_size


def linear_eval(checkpoint: str, train_path: str, val_path: str, image_size: int | None = None,
                epochs: int = 100, lr: float = 0.001, batch_size: int = 256,
                n_last_blocks: int = 4, avgpool: bool = False, num_workers: int = 2,
                output_dir: str | None = None, device: str | None = None, seed: int = 0,
                on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
                which: str = "teacher", crop_scale: float = 0.08, preset: str | None = None,
                config_file: str | None = None,
                overrides: list[str] | tuple[str, ...] = (),
                on_settings: Callable[[str], None] = lambda note: None) -> dict[str, Any]:
    """Linear probe of the teacher backbone (``dino_core.eval.linear.train_linear``) on
    RandomResizedCrop + flip train views, scored on Resize + CenterCrop val views.

    ``output_dir`` (local) receives ``linear_probe.pt`` after every epoch (a rerun with the same
    directory resumes) and ``linear_results.json`` at the end. The settings (procedural set,
    image size) are chosen and reported as ``knn_eval``'s (``data`` with its ``note``, also
    given to ``on_settings`` once the input is checked).
    """
    if not 0 < crop_scale <= 1:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
    if output_dir is not None and not storage.is_local(output_dir):
        raise ValueError(f"--output-dir must be a local directory, got {output_dir}")
    model, file_cfg = load_backbone(checkpoint, which)
    settings = eval_settings(checkpoint, file_cfg, preset, config_file, overrides)
    cfg = settings.cfg
    size_given = image_size is not None
    image_size = eval_image_size(image_size, cfg, model)
    used = describe("linear probe", settings, train_path, val_path, image_size, size_given)
    blocks = len(getattr(model, "blocks", ()))
    if blocks and not 1 <= n_last_blocks <= blocks:
        raise ValueError(f"--n-last-blocks {n_last_blocks}: the backbone has {blocks} blocks")
    train_ds = labeled_split(train_path, image_size, cfg, True,
                             linear_train_transform(image_size, scale=(crop_scale, 1.0)))
    val_ds = labeled_split(val_path, image_size, cfg, False)
    data.align_classes(train_ds, val_ds)
    num_classes = data.num_classes(train_ds, val_ds)
    on_settings(used["note"])  # the input is checked: before the (long) training, not on error
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(output_dir.removeprefix("file://")) if output_dir else None
    res = train_linear(model, train_ds, val_ds, epochs=epochs, lr=lr, batch_size=batch_size,
                       n_last_blocks=n_last_blocks, avgpool=avgpool, num_classes=num_classes,
                       device=device, checkpoint_path=out / "linear_probe.pt" if out else None,
                       num_workers=num_workers, seed=seed, on_epoch_end=on_epoch_end)
    res.pop("classifier")
    if math.isnan(res["train_loss"]):  # nothing left to train: JSON has no NaN
        res["train_loss"] = None
    res.update(n_train=len(train_ds), n_last_blocks=n_last_blocks, avgpool=avgpool, lr=lr,
               crop_scale=crop_scale,
               batch_size=batch_size, image_size=image_size, data=used)
    if out is not None:
        (out / "linear_results.json").write_text(json.dumps(res, indent=1))
    return res
