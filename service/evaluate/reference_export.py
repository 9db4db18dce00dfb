"""``dino export --format reference``: a checkpoint as the reference DINO code's files.

From a checkpoint directory, URL or run folder: main_dino's ``checkpoint.pth`` (teacher and
student in its key layout, ``args``, ``epoch``, ``dino_loss`` with the center), which the
reference's ``eval_knn.py``, ``eval_linear.py`` and ``visualize_attention.py`` read with
``--pretrained_weights checkpoint.pth --checkpoint_key teacher``. From an exported
``.safetensors`` or a distillation run's checkpoint (its student has projectors, not
main_dino's head): the flat backbone file the reference publishes (``--pretrained_weights``
alone). The layout is ``dino_core.interop.reference``'s.
"""

from __future__ import annotations

import logging
from typing import Any

from safetensors.torch import load_file

from dino_core.interop.export import backbone_state_from_checkpoint
from dino_core.interop.reference import (
    reference_backbone_state,
    reference_checkpoint,
    save_reference,
)
from service import storage
from service.config import DinoConfig
from service.evaluate.backbone import check_out, fetch_file, put_file, safetensors_metadata
from service.storage import checkpoints as ckpt

log = logging.getLogger(__name__)


def main_dino_args(cfg: DinoConfig) -> dict[str, Any]:
    """main_dino.py's arguments that a run's config answers (the rest keep main_dino's
    defaults in the file)."""
    workers = cfg.ray.num_workers
    return {
        "arch": cfg.model.arch, "patch_size": cfg.model.patch_size,
        "out_dim": cfg.model.out_dim, "norm_last_layer": cfg.model.norm_last_layer,
        "use_bn_in_head": cfg.model.use_bn_in_head,
        "drop_path_rate": cfg.model.drop_path_rate,
        "momentum_teacher": cfg.optim.momentum_teacher,
        "warmup_teacher_temp": cfg.loss.warmup_teacher_temp,
        "teacher_temp": cfg.loss.teacher_temp,
        "warmup_teacher_temp_epochs": cfg.loss.warmup_teacher_temp_epochs,
        "use_fp16": cfg.train.precision == "fp16", "weight_decay": cfg.optim.weight_decay,
        "weight_decay_end": cfg.optim.weight_decay_end, "clip_grad": cfg.optim.clip_grad,
        "batch_size_per_gpu": max(cfg.train.batch_size // workers, 1),
        "epochs": cfg.train.epochs, "freeze_last_layer": cfg.optim.freeze_last_layer,
        "lr": cfg.optim.lr, "warmup_epochs": cfg.optim.warmup_epochs,
        "min_lr": cfg.optim.min_lr, "global_crops_scale": tuple(cfg.aug.global_scale),
        "local_crops_number": cfg.aug.n_local, "local_crops_scale": tuple(cfg.aug.local_scale),
        "data_path": cfg.data.path, "seed": cfg.train.seed,
        "num_workers": cfg.data.num_workers, "world_size": workers,
    }  # fmt: skip


def export_reference(checkpoint_uri: str, out: str) -> str:
    """Writes ``checkpoint_uri`` (a checkpoint or an exported ``.safetensors``) in the
    reference's format to ``out`` (a local path or a URL); returns ``out``."""
    if storage.is_local(out):
        check_out(out, "checkpoint.pth")
    if checkpoint_uri.endswith(".pth"):
        raise ValueError(f"{checkpoint_uri} is a reference file already")
    if checkpoint_uri.endswith(".safetensors"):
        local = fetch_file(checkpoint_uri)
        safetensors_metadata(local, checkpoint_uri)  # a damaged file: one line naming it
        obj: dict[str, Any] = reference_backbone_state(load_file(local))
    else:
        _, state = ckpt.load(checkpoint_uri)
        cfg = DinoConfig.model_validate(state["config"])
        if "distill" in state:  # the distilled backbone alone: main_dino has no projectors
            obj = reference_backbone_state(backbone_state_from_checkpoint(state))
        else:
            obj = reference_checkpoint(state["teacher"], state["student"],
                                       center=state["center"], epoch=int(state["epoch"]),
                                       args=main_dino_args(cfg))
    blocks = {k.split("blocks.")[1].split(".")[0] for k in obj.get("teacher", obj)
              if "blocks." in k}
    if blocks and len(blocks) != 12:
        log.warning("%s: a ViT of %d blocks; the reference's vit_* constructors build 12, so "
                    "its scripts (load_state_dict(strict=False)) would leave the other blocks "
                    "random", out, len(blocks))
    return put_file(out, "checkpoint.pth", lambda path: save_reference(path, obj))
