"""Distillation: a large frozen teacher trains a small student (DINOv2, Oquab et al. 2024,
Sec. 5; DINOv3's ``multidist_meta_arch``).

- ``tokens``: the CLS feature and the patch grid of any backbone (timm ViT or ResNet-50);
- ``teacher``: the frozen teacher (eval mode, no gradient, bf16 on CUDA) and the SHA-256 of
  its weights;
- ``resample``: a patch grid resampled to another grid (patch or crop sizes differ);
- ``student``: the student backbone with its projectors (and its DINO head when asked);
- ``objective``: the feature and DINO distillation terms, weighed;
- ``step``: one training step (``teach``: the teacher once for several students).

The losses themselves are ``dino_core.losses.feature_distill`` and
``dino_core.losses.dino_distill``.
"""

from dino_core.distill.objective import DistillObjective
from dino_core.distill.resample import resample_patches
from dino_core.distill.step import teach, train_step_distill
from dino_core.distill.student import DistillStudent, StudentOutput
from dino_core.distill.teacher import FrozenTeacher, TeacherOutput, load_teacher, parameter_sha256
from dino_core.distill.tokens import Tokens, backbone_features

__all__ = [
    "DistillObjective",
    "DistillStudent",
    "FrozenTeacher",
    "StudentOutput",
    "TeacherOutput",
    "Tokens",
    "backbone_features",
    "load_teacher",
    "parameter_sha256",
    "resample_patches",
    "teach",
    "train_step_distill",
]
