"""Feature distillation: the student, through a small projector, predicts the frozen
teacher's normalised CLS and patch features.

The target is the teacher's feature passed through a LayerNorm without affine parameters
(each token's channels brought to mean 0 and variance 1), the "feature whitening" of Wei et
al., "Contrastive Learning Rivals Masked Image Modeling in Fine-tuning via Feature
Distillation", 2022, Sec. 3.1. Why not an l2 normalisation: teachers differ wildly in scale
(a DINOv2 ViT-g's tokens have norms in the hundreds, a ResNet's post-ReLU map is all
positive), and the smooth-L1 loss has a fixed threshold (``beta``) between its quadratic and
linear parts. After LayerNorm every target channel is of order 1 whatever the teacher and its
width, so ``beta = 1`` and the loss weights mean the same for every teacher; after an l2
normalisation the channels would be of order ``1 / sqrt(D)``, and the smooth-L1 loss a tiny
quadratic. The cosine loss ignores the scale but not the centring: LayerNorm also removes
each token's mean over channels, a direction that all the teacher's tokens share and a
student would otherwise get most of its cosine from. The student's prediction is not
normalised: the projector learns the scale.

Two losses per token, selectable: ``cosine``, ``1 - cos(pred, target)``, and ``smooth_l1``,
the mean over channels of the Huber-like smooth L1 of ``pred - target``. The CLS and the
patch terms are weighted separately; either weight may be 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FeatureLoss = Literal["cosine", "smooth_l1"]


class FeatureProjector(nn.Module):
    """The student's features ``(..., D_s)`` mapped to the teacher's width ``(..., D_t)``:
    one linear layer, or two with a GELU between (``hidden_dim``).

    Args:
        in_dim: D_s.
        out_dim: D_t.
        hidden_dim: the MLP's width; 0: a single linear layer.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 0) -> None:
        super().__init__()
        if hidden_dim < 0:
            raise ValueError(f"hidden_dim must be >= 0, got {hidden_dim}")
        self.net: nn.Module = (
            nn.Linear(in_dim, out_dim) if hidden_dim == 0 else
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def feature_target(teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The teacher's features ``(..., D_t)`` layer-normalised over D_t (no affine), fp32,
    without gradient."""
    t = teacher.detach().float()
    return F.layer_norm(t, t.shape[-1:], eps=eps)


def feature_distill_loss(
    pred: torch.Tensor, teacher: torch.Tensor, loss: FeatureLoss = "cosine", beta: float = 1.0
) -> torch.Tensor:
    """The mean over tokens of the loss between the student's prediction and the target.

    Args:
        pred: ``(..., D_t)``, the projected student features (CLS ``(B, D_t)`` or patches
            ``(B, N, D_t)``).
        teacher: the teacher's raw features, the same shape (patches already resampled to
            the student's grid); ``feature_target`` normalises them here.
        loss: ``cosine``: ``1 - cos(pred, target)`` per token; ``smooth_l1``: per token the
            mean over D_t of ``smooth_l1(pred - target)``.
        beta: smooth L1's switch from quadratic to linear.

    Returns:
        The scalar loss, fp32.
    """
    if pred.shape != teacher.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} != teacher {tuple(teacher.shape)}")
    target = feature_target(teacher)
    with torch.autocast(pred.device.type, enabled=False):
        p = pred.float()
        if loss == "cosine":
            return (1.0 - F.cosine_similarity(p, target, dim=-1, eps=1e-8)).mean()
        if loss == "smooth_l1":
            return F.smooth_l1_loss(p, target, beta=beta)
    raise ValueError(f"loss must be 'cosine' or 'smooth_l1', got {loss!r}")


class FeatureDistillLoss(nn.Module):
    """The weighted CLS and patch terms of ``feature_distill_loss`` (no parameters: the
    projectors belong to the student, ``dino_core.distill.student``, so one DDP wrapper and
    one optimizer hold them).

    Args:
        cls_weight: of the CLS term (0 leaves it out).
        patch_weight: of the patch term (0 leaves it out).
        loss: ``cosine`` or ``smooth_l1``.
        beta: smooth L1's threshold.
    """

    def __init__(self, cls_weight: float = 1.0, patch_weight: float = 1.0,
                 loss: FeatureLoss = "cosine", beta: float = 1.0) -> None:
        super().__init__()
        if loss not in ("cosine", "smooth_l1"):
            raise ValueError(f"loss must be 'cosine' or 'smooth_l1', got {loss!r}")
        if cls_weight < 0 or patch_weight < 0 or cls_weight + patch_weight == 0:
            raise ValueError(f"weights must be >= 0 and not both 0, got cls {cls_weight}, "
                             f"patch {patch_weight}")
        self.cls_weight = cls_weight
        self.patch_weight = patch_weight
        self.loss: FeatureLoss = loss
        self.beta = beta

    def forward(
        self,
        pred_cls: torch.Tensor | None,
        pred_patches: torch.Tensor | None,
        teacher_cls: torch.Tensor,
        teacher_patches: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``{"feat_cls": w_c L_cls, "feat_patch": w_p L_patch}``, the terms of nonzero weight.

        Args:
            pred_cls: ``(B, D_t)``; None when the CLS weight is 0.
            pred_patches: ``(B, N, D_t)`` on the student's grid; None when the patch weight
                is 0.
            teacher_cls: ``(B, D_t)``.
            teacher_patches: ``(B, N, D_t)``, resampled to the student's grid.
        """
        terms = {}
        for name, weight, pred, teacher in (("feat_cls", self.cls_weight, pred_cls, teacher_cls),
                                            ("feat_patch", self.patch_weight, pred_patches,
                                             teacher_patches)):
            if not weight:
                continue
            if pred is None:
                raise ValueError(f"{name} has weight {weight} but no prediction (no projector)")
            terms[name] = weight * feature_distill_loss(pred, teacher, self.loss, self.beta)
        return terms
