"""The student of distillation: the backbone being trained, with what it needs to be
compared with the teacher.

Feature distillation maps its CLS and patch features to the teacher's width through two
small projectors (``dino_core.losses.feature_distill.FeatureProjector``; CLS and patch
tokens get one each, their statistics differ); DINO distillation needs a DINO head of the
teacher head's K. Both live in this one module, not in the loss, so that a single optimizer,
clipping, EMA copy and DDP wrapper cover everything that trains. The backbone is exported
alone at the end; the projectors and the head are dropped, as DINO drops its head.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from dino_core.distill.tokens import backbone_features
from dino_core.losses.feature_distill import FeatureProjector


class StudentOutput(NamedTuple):
    """The student on a step's crops.

    ``cls``: ``(n_global * B, D_t)`` projected CLS features of the global crops (None without
    a CLS projector); ``patches``: ``(n_global * B, N, D_t)`` projected patch tokens on
    ``grid`` ``(h, w)`` (None without a patch projector); ``out``: ``(n_crops * B, K)``, the
    DINO head on every crop (None without a head).
    """

    cls: torch.Tensor | None
    patches: torch.Tensor | None
    grid: tuple[int, int]
    out: torch.Tensor | None


class DistillStudent(nn.Module):
    """A backbone with its feature projectors and, optionally, a DINO head.

    Args:
        backbone: a timm ViT or a torchvision ResNet-50 (``dino_core.models.build_backbone``).
        teacher_dim: D_t, the projectors' output width; None: no projectors (DINO
            distillation alone).
        hidden_dim: the projectors' hidden width; 0: a linear projector.
        head: a ``DINOHead`` with the teacher head's K, for DINO distillation.
        project_cls: build the CLS projector (off when the CLS term's weight is 0, so no
            parameter goes unused, which DDP would reject).
        project_patches: build the patch projector.
    """

    cls_proj: FeatureProjector | None
    patch_proj: FeatureProjector | None

    def __init__(self, backbone: nn.Module, teacher_dim: int | None, hidden_dim: int = 0,
                 head: nn.Module | None = None, project_cls: bool = True,
                 project_patches: bool = True) -> None:
        super().__init__()
        dim = int(backbone.embed_dim)  # type: ignore[arg-type]
        self.backbone = backbone
        self.head = head
        self.cls_proj = self.patch_proj = None
        if teacher_dim is not None and project_cls:
            self.cls_proj = FeatureProjector(dim, teacher_dim, hidden_dim)
        if teacher_dim is not None and project_patches:
            self.patch_proj = FeatureProjector(dim, teacher_dim, hidden_dim)

    def forward(self, crops: list[torch.Tensor], n_global: int = 2) -> StudentOutput:
        """Args: ``crops``, ``[global_1, ..., local_1, ...]``, each ``(B, 3, H_i, W_i)``, the
        global crops of one size; the local ones are read only by the head."""
        tokens = backbone_features(self.backbone, torch.cat(crops[:n_global]))
        cls = self.cls_proj(tokens.cls) if self.cls_proj is not None else None
        patches = self.patch_proj(tokens.patches) if self.patch_proj is not None else None
        out = None
        if self.head is not None:
            local = list(crops[n_global:])
            if len({c.shape[-2:] for c in local}) == 1:  # the usual case: one call for all
                local = [torch.cat(local)]
            out = self.head(torch.cat([tokens.cls] + [self.backbone(c) for c in local]))
        return StudentOutput(cls, patches, tokens.grid, out)


def ema_copy(student: nn.Module) -> nn.Module:
    """A copy of the student for its EMA (DINOv2's "spare EMA" of a distilled student, the
    model it keeps): no gradients; pair them with ``dino_core.builder.ema_parameter_lists``."""
    return copy.deepcopy(student).requires_grad_(False)
