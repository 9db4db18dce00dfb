"""DINO distillation: the student's DINO head is trained against a frozen teacher's head,
as DINOv2 distils its smaller models from ViT-g (Oquab et al. 2024, Sec. 5, "Model
distillation": the training loop of pretraining with a larger model as the frozen teacher,
the student keeping a spare EMA of itself as the final model).

The targets are DINO's: the teacher's head scores on the global crops, centred (an EMA
center, or Sinkhorn-Knopp) and sharpened by the teacher temperature
(``dino_core.losses.centering``), and the loss is DINO's cross-entropy over the pairs of
(teacher global view, student view) (``dino_core.losses.dino.dino_cross_entropy``). A
frozen teacher cannot collapse, but its head was trained on centred targets, so centring
keeps the targets the teacher's training saw.

One difference from self-distillation: the pair of a view with itself is trivial when the
teacher is the student's average, not when it is another network, so ``ignore_diagonal``
(DINO's and dinov3's default, True) can be turned off to also learn the teacher's view of
the same crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dino_core.losses.centering import (
    Centering,
    Reduce,
    ema_center_update,
    identity,
    sinkhorn_knopp,
    softmax_centered,
)
from dino_core.losses.dino import dino_cross_entropy


def dino_distill_cross_entropy(
    student_out: torch.Tensor,
    teacher_p: torch.Tensor,
    student_temp: float,
    n_global: int = 2,
    ignore_diagonal: bool = True,
) -> torch.Tensor:
    """The mean over (teacher view q, student view v) pairs of ``-p_q . log softmax(s_v /
    tau_s)`` (each a mean over the batch); with ``ignore_diagonal`` the pairs ``v == q`` are
    left out (``dino_cross_entropy``).

    Args:
        student_out: ``(n_crops * B, K)``, rows grouped by crop, global crops first.
        teacher_p: ``(n_global * B, K)`` target probabilities.
        student_temp: tau_s.
        n_global: the number of global crops.
        ignore_diagonal: leave out the pairs of a view with itself.
    """
    if ignore_diagonal:
        return dino_cross_entropy(student_out, teacher_p, student_temp, n_global)
    n_crops = student_out.shape[0] // (teacher_p.shape[0] // n_global)
    logp = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    all_views = torch.stack(logp).sum(0)  # every student view, shared by every teacher view
    per_teacher_view = [-(p * all_views).sum(-1).mean() for p in teacher_p.detach().chunk(n_global)]
    return torch.stack(per_teacher_view).sum() / (n_global * n_crops)


class DINODistillLoss(nn.Module):
    """The DINO distillation loss; holds the center of the teacher's scores.

    Args:
        out_dim: K, the teacher head's (and the student head's) number of prototypes.
        student_temp: tau_s (0.1).
        center_momentum: of the EMA center (0.9).
        centering: ``ema`` or ``sinkhorn_knopp``.
        ignore_diagonal: see ``dino_distill_cross_entropy``.
        all_reduce_sum: sums a tensor over processes (identity for one).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: Centering = "ema", ignore_diagonal: bool = True,
                 all_reduce_sum: Reduce = identity) -> None:
        super().__init__()
        if centering not in ("ema", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn_knopp', got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering: Centering = centering
        self.ignore_diagonal = ignore_diagonal
        self.all_reduce_sum = all_reduce_sum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``(n_global * B, K)`` teacher scores to target probabilities, fp32, no gradient."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_out, teacher_temp, all_reduce_sum=self.all_reduce_sum)
        return softmax_centered(teacher_out, self.center, teacher_temp)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                teacher_temp: float, n_global: int = 2) -> torch.Tensor:
        """The scalar loss (fp32); the center is not updated here (``update_center``).

        Args:
            student_out: ``(n_crops * B, K)``, the student's head on every crop.
            teacher_out: ``(n_global * B, K)``, the teacher's head on the global crops.
            teacher_temp: tau_t of this step.
            n_global: the number of global crops.
        """
        if student_out.shape[-1] != teacher_out.shape[-1]:
            raise ValueError(f"student head has {student_out.shape[-1]} prototypes, teacher "
                             f"head {teacher_out.shape[-1]}")
        p = self.targets(teacher_out, teacher_temp)
        return dino_distill_cross_entropy(student_out, p, self.student_temp, n_global,
                                          self.ignore_diagonal)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor, keep_if: torch.Tensor | None = None) -> None:
        """The EMA center's update with this step's teacher scores (nothing for
        Sinkhorn-Knopp); ``keep_if`` False (a device bool) leaves it as it is."""
        if self.centering == "ema":
            ema_center_update(self.center, teacher_out, self.center_momentum,
                              self.all_reduce_sum, keep_if=keep_if)
