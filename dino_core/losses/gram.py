"""DINOv3's Gram anchoring: keep the patch-to-patch similarities of the student close to those
of an earlier snapshot of the teacher (the "Gram teacher"), whose dense features were still
clean (Siméoni et al., "DINOv3", 2025, Sec. 4.2, Eq. 3):

    L_Gram = || X_S X_S^T - X_G X_G^T ||_F^2,

over the L2-normalised patch features X of each global crop, averaged over its entries and
the crops. The weight and the snapshot's refreshes are functions of the global step, so a
resumed run reads the same values as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gram_loss(
    student_patches: torch.Tensor,
    teacher_patches: torch.Tensor,
    normalize: bool = True,
    img_level: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
) -> torch.Tensor:
    """Mean squared difference of the student's and the Gram teacher's patch Gram matrices.

    Args:
        student_patches: ``(B, N, D)``, the student's patch features of B global crops, N
            patches each (``(B * N, D)`` or any ``(..., D)`` with ``img_level=False``).
        teacher_patches: the Gram teacher's, the same shape (resized to the student's grid
            beforehand if the snapshot sees larger crops); no gradient flows into them.
        normalize: L2-normalise the features first, so the Gram entries are cosines (dinov3's
            ``gram.normalized``, on in every recipe).
        img_level: one ``N x N`` Gram matrix per crop (DINOv3's anchoring recipe); False: one
            ``BN x BN`` matrix over the flattened batch (dinov3's config default).
        remove_neg: clamp both matrices' negative entries to 0.
        remove_only_teacher_neg: clamp the teacher's negative entries to 0, and the student's
            where both are negative (a student that is negative where the teacher is not still
            pays for it). At most one of the two.

    Returns:
        The scalar loss, fp32: the mean over ``B N N`` entries (``(BN)^2`` at batch level).
    """
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("remove_neg and remove_only_teacher_neg are exclusive")
    if student_patches.shape != teacher_patches.shape:
        raise ValueError(
            f"student {tuple(student_patches.shape)} != teacher {tuple(teacher_patches.shape)}"
        )
    if img_level and student_patches.dim() != 3:
        raise ValueError(f"img_level needs (B, N, D) features, got {tuple(student_patches.shape)}")
    s = student_patches.float()
    t = teacher_patches.detach().float()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if not img_level:
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    gram_s = s @ s.transpose(-1, -2)
    gram_t = t @ t.transpose(-1, -2)
    if remove_neg:
        gram_s, gram_t = gram_s.clamp(min=0), gram_t.clamp(min=0)
    elif remove_only_teacher_neg:
        gram_s = torch.where((gram_s < 0) & (gram_t < 0), 0.0, gram_s)
        gram_t = gram_t.clamp(min=0)
    return F.mse_loss(gram_s, gram_t)


class GramLoss(nn.Module):
    """``gram_loss`` with its options fixed at construction (see there)."""

    def __init__(
        self,
        normalize: bool = True,
        img_level: bool = True,
        remove_neg: bool = False,
        remove_only_teacher_neg: bool = False,
    ) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg are exclusive")
        self.normalize = normalize
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` student and Gram-teacher patch features to the scalar loss."""
        return gram_loss(
            student_patches, teacher_patches, self.normalize, self.img_level,
            self.remove_neg, self.remove_only_teacher_neg,
        )  # fmt: skip


def gram_weight(step: int, start_step: int, ramp_steps: int, weight: float) -> float:
    """The loss weight at global step ``step``: 0 before ``start_step``, then a half-cosine
    rise to ``weight`` over ``ramp_steps`` steps, then ``weight``.

    DINOv3's anchoring config (``loss_weight_schedule``: 0 for 1,000 epochs of 1,000 steps,
    then a cosine to 2.0 over one epoch) is ``gram_weight(step, 1_000_000, 1_000, 2.0)``;
    ``ramp_steps=0`` switches the loss on at once.
    """
    if step < start_step:
        return 0.0
    if step >= start_step + ramp_steps:
        return weight
    return weight * 0.5 * (1.0 - math.cos(math.pi * (step - start_step) / ramp_steps))


def gram_refreshes_before(
    step: int, first_step: int, every: int, max_updates: int | None = None
) -> int:
    """How many times the Gram teacher was refreshed before global step ``step`` (by
    ``gram_refresh_due`` at steps ``0 .. step - 1``): a resumed run needs no counter."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    lo = max(first_step, 1)  # refreshes fall at the ends u = t + 1 of steps t >= 0
    n = 0 if step < lo else step // every - (lo - 1) // every
    return n if max_updates is None else min(n, max_updates)


def gram_refresh_due(
    step: int, first_step: int, every: int, max_updates: int | None = None
) -> bool:
    """Whether to copy the EMA teacher into the Gram teacher after global step ``step``
    (after its optimizer step and EMA update), as dinov3's ``gram.rep_update``: when
    ``step + 1 >= first_step``, ``step + 1`` is a multiple of ``every``, and fewer than
    ``max_updates`` refreshes happened before (no limit when None).

    DINOv3's anchoring config: ``first_step=1_010_000, every=10_000, max_updates=3``.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    end = step + 1
    if end < first_step or end % every:
        return False
    return max_updates is None or gram_refreshes_before(step, first_step, every) < max_updates
