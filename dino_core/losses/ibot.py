"""The iBOT masked-patch loss: the student, shown a global crop with some patches masked,
predicts the teacher's output on those patches from the unmasked crop.

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022, Eq. (2);
weighted per image as DINOv2 does it (Oquab et al. 2024, Sec. 4; ``forward_masked`` with
``masks_weight``): every image's masked patches share a weight of one, so an image with few
masked patches counts as much as one with many.
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


def ibot_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """``-1/B sum_b 1/|M_b| sum_{p in M_b} t_p . log softmax(s_p / tau_s)``.

    ``M_b`` is image b's set of masked patches. The outer mean runs over all B images of the
    batch, masked or not (an image without masked patches adds 0), as dinov2's
    ``forward_masked`` divides by ``masks.shape[0]``: with half the images masked the value is
    half the mean over the masked images.

    Args:
        student_logits: ``(M, K)``, the student's patch head on the masked patches, in the
            order of ``masks.flatten().nonzero()`` (image by image, raster order within).
        teacher_probs: ``(M, K)``, the teacher's targets for the same patches (centred and
            sharpened; no gradient flows into them).
        masks: ``(B, N)`` bool, N patches per image; ``M = masks.sum()``. It may stay on the
            CPU, where the collate made it: then nothing here waits on the device.
        student_temp: tau_s.

    Returns:
        The scalar loss, fp32.
    """
    masks = masks.flatten(1)
    n_masked = masks.sum(1)
    if (
        student_logits.shape[0] != int(n_masked.sum())
        or teacher_probs.shape != student_logits.shape
    ):
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_probs.shape)} "
            f"must both be (masks.sum() = {int(n_masked.sum())}, K)"
        )
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_patch = (teacher_probs.detach().float() * log_p).sum(-1)  # (M,)
    weight = (1.0 / n_masked.clamp(min=1).float())[:, None].expand_as(masks)[masks]
    weight = weight.to(per_patch.device, non_blocking=True)
    return -(per_patch * weight).sum() / masks.shape[0]


class IBOTPatchLoss(nn.Module):
    """The iBOT patch loss with the teacher's own centering (``"ema"`` or
    ``"sinkhorn_knopp"``), whose cross-process sums are injected.

    The EMA center is this module's buffer ``center`` ``(1, K)``, apart from the DINO term's
    (iBOT keeps two centers; dinov2's patch center momentum is 0.9).

    Args:
        out_dim: K, the patch head's prototypes.
        student_temp: tau_s (0.1).
        center_momentum: m of the patch center (0.9).
        centering: ``"ema"`` (dinov2's default) or ``"sinkhorn_knopp"`` (dinov2's recipe for
            the large runs, dinov3's only one).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
        all_reduce_sum: sums a tensor over processes (identity: one process).
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: Centering = "ema",
        sinkhorn_iterations: int = 3,
        all_reduce_sum: Reduce = identity,
    ) -> None:
        super().__init__()
        if centering not in ("ema", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn_knopp', got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.all_reduce_sum = all_reduce_sum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The targets: ``(M, K)`` teacher logits on the masked patches to ``(M, K)`` fp32
        probabilities (Sinkhorn-Knopp over the masked patches of all ranks)."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(
                teacher_logits, teacher_temp, self.sinkhorn_iterations, self.all_reduce_sum
            )
        return softmax_centered(teacher_logits, self.center, teacher_temp)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        masks: torch.Tensor,
        teacher_temp: float,
        update_center: bool = True,
    ) -> torch.Tensor:
        """The loss on this rank's masked patches, then (``"ema"``) the center update.

        Args:
            student_logits: ``(M, K)``, the student's patch head on the masked patches, in the
                order of ``masks.flatten().nonzero()``.
            teacher_logits: ``(M, K)``, the teacher's patch head on the same patches of the
                unmasked crop.
            masks: ``(B, N)`` bool, this rank's masks (B global crops of N patches).
            teacher_temp: tau_t of this iteration.
            update_center: update the EMA center now; pass False and call
                ``update_center`` once the loss is known to be finite.

        Returns:
            The scalar loss, fp32, averaged per image then over this rank's B images.
        """
        loss = ibot_cross_entropy(
            student_logits, self.teacher_probs(teacher_logits, teacher_temp), masks,
            self.student_temp,
        )  # fmt: skip
        if update_center:
            self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(
        self,
        teacher_logits: torch.Tensor,
        valid: torch.Tensor | None = None,
        keep_if: torch.Tensor | None = None,
    ) -> None:
        """``c <- m c + (1 - m) mean(t)`` over the masked patches of all ranks (a no-op with
        ``"sinkhorn_knopp"``, which keeps no state).

        Args:
            teacher_logits: ``(M, K)``, the teacher's logits on this rank's masked patches.
            valid: ``(M,)`` bool, the rows that count (for a padded buffer).
            keep_if: a device bool; when False the center is left as it is (no host sync).
        """
        if self.centering == "ema":
            ema_center_update(
                self.center, teacher_logits, self.center_momentum, self.all_reduce_sum,
                valid, keep_if,
            )  # fmt: skip
