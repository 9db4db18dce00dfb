"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021)
in plain PyTorch. This package never imports ray, mlflow, fsspec, s3fs or boto.

The names below load their module on first use (PEP 562), so ``import dino_core.specs``
costs no torch import: a config can be checked without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "DINOHead": "dino_core.models",
    "DINOLoss": "dino_core.losses.dino",
    "MultiCropSpec": "dino_core.specs",
    "MultiCropWrapper": "dino_core.models",
    "NetworkSpec": "dino_core.specs",
    "NonFiniteLossError": "dino_core.step",
    "RecipeSpec": "dino_core.specs",
    "ScheduleSpec": "dino_core.specs",
    "Schedules": "dino_core.schedules",
    "StepConfig": "dino_core.step",
    "StepOutput": "dino_core.step",
    "build_backbone": "dino_core.models",
    "build_networks": "dino_core.builder",
    "build_optimizer": "dino_core.optim",
    "build_schedules": "dino_core.schedules",
    "cancel_last_layer_gradients": "dino_core.optim",
    "clip_gradients": "dino_core.optim",
    "cosine_schedule": "dino_core.schedules",
    "ema_parameter_lists": "dino_core.builder",
    "ema_update": "dino_core.ema",
    "knn_classify": "dino_core.knn",
    "load_backbone": "dino_core.interop.export",
    "save_backbone": "dino_core.interop.export",
    "teacher_stats": "dino_core.monitors",
    "train_step": "dino_core.step",
    "train_step_distill": "dino_core.distill.step",
    "train_step_recipe": "dino_core.step_recipe",
}
__all__ = [
    "DINOHead",
    "DINOLoss",
    "MultiCropSpec",
    "MultiCropWrapper",
    "NetworkSpec",
    "NonFiniteLossError",
    "RecipeSpec",
    "ScheduleSpec",
    "Schedules",
    "StepConfig",
    "StepOutput",
    "build_backbone",
    "build_networks",
    "build_optimizer",
    "build_schedules",
    "cancel_last_layer_gradients",
    "clip_gradients",
    "cosine_schedule",
    "ema_parameter_lists",
    "ema_update",
    "knn_classify",
    "load_backbone",
    "save_backbone",
    "teacher_stats",
    "train_step",
    "train_step_distill",
    "train_step_recipe",
]

if TYPE_CHECKING:
    from dino_core.builder import build_networks, ema_parameter_lists
    from dino_core.distill.step import train_step_distill
    from dino_core.ema import ema_update
    from dino_core.interop.export import load_backbone, save_backbone
    from dino_core.knn import knn_classify
    from dino_core.losses.dino import DINOLoss
    from dino_core.models import DINOHead, MultiCropWrapper, build_backbone
    from dino_core.monitors import teacher_stats
    from dino_core.optim import build_optimizer, cancel_last_layer_gradients, clip_gradients
    from dino_core.schedules import Schedules, build_schedules, cosine_schedule
    from dino_core.specs import MultiCropSpec, NetworkSpec, RecipeSpec, ScheduleSpec
    from dino_core.step import NonFiniteLossError, StepConfig, StepOutput, train_step
    from dino_core.step_recipe import train_step_recipe


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dino_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
