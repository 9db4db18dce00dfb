"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021)
in plain PyTorch. This package never imports ray, mlflow, fsspec, s3fs or boto."""

from dino_core.builder import NetworkSpec, build_networks, ema_parameter_lists
from dino_core.ema import ema_update
from dino_core.export import load_backbone, save_backbone
from dino_core.knn import knn_classify
from dino_core.loss import DINOLoss
from dino_core.models import DINOHead, MultiCropWrapper, build_backbone
from dino_core.monitors import teacher_stats
from dino_core.optim import build_optimizer, cancel_last_layer_gradients, clip_gradients
from dino_core.schedules import Schedules, build_schedules, cosine_schedule
from dino_core.train_step import NonFiniteLossError, StepConfig, StepOutput, train_step

__all__ = [
    "DINOHead",
    "DINOLoss",
    "MultiCropWrapper",
    "NetworkSpec",
    "NonFiniteLossError",
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
]
