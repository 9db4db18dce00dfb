"""The losses: DINO's own (``dino``, and ``dino_chunked``, the last layer and the loss fused
and chunked over K), and those of the DINOv2/DINOv3 recipe: teacher centering (EMA or
Sinkhorn-Knopp), iBOT's masked-patch loss, the KoLeo regulariser and DINOv3's Gram anchoring;
and those of distillation from a frozen teacher (``feature_distill``, ``dino_distill``).

Every cross-process reduction is injected (a callable, identity by default), so each loss
runs without a process group and under DDP alike.
"""

from dino_core.losses.centering import (
    Centering,
    Reduce,
    ema_center_update,
    identity,
    sinkhorn_knopp,
    softmax_centered,
)
from dino_core.losses.dino_distill import DINODistillLoss, dino_distill_cross_entropy
from dino_core.losses.feature_distill import (
    FeatureDistillLoss,
    FeatureProjector,
    feature_distill_loss,
    feature_target,
)
from dino_core.losses.gram import (
    GramLoss,
    gram_loss,
    gram_refresh_due,
    gram_refreshes_before,
    gram_weight,
)
from dino_core.losses.ibot import IBOTPatchLoss, ibot_cross_entropy
from dino_core.losses.koleo import Gather, KoLeoLoss, koleo_loss, no_gather

__all__ = [
    "Centering",
    "DINODistillLoss",
    "FeatureDistillLoss",
    "FeatureProjector",
    "Gather",
    "GramLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "Reduce",
    "dino_distill_cross_entropy",
    "ema_center_update",
    "feature_distill_loss",
    "feature_target",
    "gram_loss",
    "gram_refresh_due",
    "gram_refreshes_before",
    "gram_weight",
    "ibot_cross_entropy",
    "identity",
    "koleo_loss",
    "no_gather",
    "sinkhorn_knopp",
    "softmax_centered",
]
