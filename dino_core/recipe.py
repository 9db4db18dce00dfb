"""The losses of the DINOv2/DINOv3 recipe, put together: DINO on the CLS tokens, iBOT on the
masked patches, KoLeo on the student's CLS features, Gram anchoring on the patch features
(Oquab et al. 2024, Sec. 4; Siméoni et al. 2025, Sec. 4.2), and the Gram teacher's snapshot.

Each term is one of ``dino_core.losses``; this module only weighs them and chooses the
teacher's centering. Every cross-process operation is injected (sums for Sinkhorn-Knopp and
the centers, a gather for the distributed KoLeo), identity for one process.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dino_core.losses.centering import Reduce, identity, sinkhorn_knopp, softmax_centered
from dino_core.losses.dino import DINOLoss, dino_cross_entropy
from dino_core.losses.dino_chunked import chunked_dino_cross_entropy
from dino_core.losses.gram import gram_loss, gram_refresh_due, gram_weight
from dino_core.losses.ibot import IBOTPatchLoss
from dino_core.losses.koleo import Gather, KoLeoLoss, no_gather
from dino_core.models.masked import backbone_tokens
from dino_core.models.multicrop import MaskedForward
from dino_core.specs import RecipeSpec


class GramAnchor(nn.Module):
    """DINOv3's Gram teacher: a frozen snapshot of the EMA teacher's backbone, its refreshes
    and its loss weight, all functions of the global step (a resumed run needs only the
    snapshot, which is in the checkpoint as this module's state dict).

    The snapshot is taken before step ``start_step`` (the teacher then, e.g. the released
    weights a continued pre-training started from), and again before every later step that
    is a multiple of ``refresh_every`` (``gram_refresh_due``), at most ``max_refreshes``
    times; the weight is ``gram_weight`` (0 before the start, a half-cosine ramp, then flat).
    """

    def __init__(self, teacher_backbone: nn.Module, spec: RecipeSpec) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(teacher_backbone).requires_grad_(False)
        self.spec = spec

    def weight(self, step: int) -> float:
        s = self.spec
        return gram_weight(step, s.gram_start_step, s.gram_ramp_steps, s.gram_weight)

    def refresh_due(self, step: int) -> bool:
        """Whether to re-snapshot the teacher before global step ``step``."""
        s = self.spec
        if step == s.gram_start_step:
            return True
        if s.gram_refresh_every_steps < 1 or step <= s.gram_start_step:
            return False
        return gram_refresh_due(step - 1, s.gram_start_step + 1, s.gram_refresh_every_steps,
                                s.gram_max_refreshes)

    @torch.no_grad()
    def refresh(self, teacher_backbone: nn.Module) -> None:
        self.backbone.load_state_dict(teacher_backbone.state_dict())

    @torch.no_grad()
    def patches(self, global_crops: torch.Tensor) -> torch.Tensor:
        """The snapshot's ``(n_global * B, N, D)`` patch features of the (unmasked) crops."""
        return backbone_tokens(self.backbone, global_crops)[1]


class RecipeLoss(nn.Module):
    """The weighted sum of the recipe's terms, from one student and one teacher pass.

    Args:
        dino: the DINO loss, owner of the DINO center (its checkpoint key stays ``center``).
        spec: weights and centering.
        all_reduce_sum: sums over processes (Sinkhorn-Knopp, the iBOT center).
        all_gather: the distributed KoLeo's gather (``no_gather``: this rank's rows only).
        fused_head_loss: the DINO term through ``chunked_dino_cross_entropy``.
        loss_chunk: its chunk over K.
    """

    def __init__(self, dino: DINOLoss, spec: RecipeSpec, all_reduce_sum: Reduce = identity,
                 all_gather: Gather = no_gather, fused_head_loss: bool = False,
                 loss_chunk: int = 8192) -> None:
        super().__init__()
        self.dino, self.spec = dino, spec
        self.all_reduce_sum = all_reduce_sum
        self.ibot = IBOTPatchLoss(dino.center.shape[1], dino.student_temp,
                                  spec.ibot_center_momentum, spec.centering,  # type: ignore[arg-type]
                                  spec.sinkhorn_iterations, all_reduce_sum)
        self.koleo = KoLeoLoss(all_gather=all_gather if spec.koleo_distributed else no_gather)
        self.fused_head_loss, self.loss_chunk = fused_head_loss, loss_chunk

    @torch.no_grad()
    def dino_targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``(n_global * B, K)`` teacher probabilities of the CLS term."""
        if self.spec.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_out, teacher_temp, self.spec.sinkhorn_iterations,
                                  self.all_reduce_sum)
        return softmax_centered(teacher_out, self.dino.center, teacher_temp)

    def forward(self, student: MaskedForward, teacher: MaskedForward, masks: torch.Tensor | None,
                teacher_temp: float, n_global: int,
                gram: tuple[float, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weighted terms (their sum is the loss), fp32 scalars.

        Args:
            student: the student's pass over all crops, the global ones masked.
            teacher: the teacher's pass over the global crops, read at the same masks.
            masks: ``(n_global * B, N)`` bool, or None without iBOT.
            teacher_temp: tau_t of this step (both terms; dinov2 uses one).
            n_global: global crops.
            gram: (weight, the Gram teacher's patch features) when anchoring is on.
        """
        s, terms = self.spec, {}
        targets = self.dino_targets(teacher.out, teacher_temp)
        if self.fused_head_loss:
            assert student.weight is not None
            terms["dino"] = chunked_dino_cross_entropy(
                student.out, targets, student.weight, self.dino.student_temp, n_global,
                self.loss_chunk)  # fmt: skip
        else:
            terms["dino"] = dino_cross_entropy(student.out, targets, self.dino.student_temp,
                                               n_global)
        if s.ibot_weight > 0 and masks is not None:
            terms["ibot"] = s.ibot_weight * self.ibot(student.masked_out, teacher.masked_out,
                                                      masks, teacher_temp, update_center=False)
        if s.koleo_weight > 0:
            # per global crop: two crops of one image are not to be pushed apart (dinov2)
            per_crop = student.cls[: teacher.out.shape[0]].chunk(n_global)
            terms["koleo"] = s.koleo_weight * sum(self.koleo(c) for c in per_crop)  # type: ignore[assignment]
        if gram is not None and gram[0] > 0:
            terms["gram"] = gram[0] * gram_loss(student.patches, gram[1], img_level=s.gram_img_level,
                                                remove_neg=s.gram_remove_neg)
        return terms

    @torch.no_grad()
    def update_centers(self, teacher: MaskedForward, keep_if: torch.Tensor | None) -> None:
        """The EMA centers of both terms (nothing with Sinkhorn-Knopp, which keeps none)."""
        if self.spec.centering == "ema":
            self.dino.update_center(teacher.out, keep_if=keep_if)
            if self.spec.ibot_weight > 0:
                self.ibot.update_center(teacher.masked_out, keep_if=keep_if)

