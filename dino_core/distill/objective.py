"""The distillation objective: the feature terms and the DINO term, weighed and combined.

Each term is one of ``dino_core.losses`` (``feature_distill``, ``dino_distill``); this module
only matches the teacher's patch grid to the student's (``resample``) and puts the terms in
one dictionary, as ``dino_core.recipe.RecipeLoss`` does for the DINOv2 recipe.
"""

from __future__ import annotations

import torch
from torch import nn

from dino_core.distill.resample import resample_patches
from dino_core.distill.student import StudentOutput
from dino_core.distill.teacher import TeacherOutput
from dino_core.losses.dino_distill import DINODistillLoss
from dino_core.losses.feature_distill import FeatureDistillLoss


class DistillObjective(nn.Module):
    """Feature distillation, DINO distillation, or both.

    Args:
        feature: the CLS and patch feature terms; None: none.
        dino: the DINO distillation term (holds the center); None: none.
        dino_weight: its weight.
    """

    def __init__(self, feature: FeatureDistillLoss | None = None,
                 dino: DINODistillLoss | None = None, dino_weight: float = 1.0) -> None:
        super().__init__()
        if feature is None and dino is None:
            raise ValueError("distillation needs a feature or a DINO objective, or both")
        self.feature = feature
        self.dino = dino
        self.dino_weight = dino_weight

    def forward(self, s: StudentOutput, t: TeacherOutput, teacher_temp: float | None = None,
                n_global: int = 2) -> dict[str, torch.Tensor]:
        """The weighted terms: ``feat_cls``, ``feat_patch``, ``dino`` (those that are on).

        Args:
            s: the student on the step's crops.
            t: the teacher on the global crops.
            teacher_temp: tau_t of this step (DINO distillation only).
            n_global: the number of global crops.
        """
        terms: dict[str, torch.Tensor] = {}
        if self.feature is not None:
            # the teacher's grid to the student's: one target per student token
            t_patches = resample_patches(t.patches, t.grid, s.grid)
            terms |= self.feature(s.cls, s.patches, t.cls, t_patches)
        if self.dino is not None:
            if s.out is None or t.out is None or teacher_temp is None:
                raise ValueError("DINO distillation needs the student's and the teacher's "
                                 "heads and a teacher temperature")
            terms["dino"] = self.dino_weight * self.dino(s.out, t.out, teacher_temp, n_global)
        return terms

    def update_centers(self, t: TeacherOutput, keep_if: torch.Tensor | None = None) -> None:
        """The DINO term's center update (nothing without it)."""
        if self.dino is not None and t.out is not None:
            self.dino.update_center(t.out, keep_if)
