"""The KoLeo regulariser: spread the student's features evenly over the sphere.

The Kozachenko-Leonenko estimator of differential entropy (Sablayrolles et al., "Spreading
vectors for similarity search", ICLR 2019), ``-1/n sum_i log(d_i)`` with ``d_i`` the distance
of feature i to its nearest neighbour, applied by DINOv2 (Oquab et al. 2024, Sec. 4) to the
L2-normalised CLS features of each global crop, weight 0.1.

Distributed (DINOv3's ``KoLeoLossDistributed``), each rank looks for the nearest neighbour of
its own rows among the rows of all ranks, through an injected ``all_gather``; the local
version is the same function with a gather that returns the rank's own rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def no_gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The gather of a single process: its own rows, starting at row 0."""
    return x, 0


def koleo_loss(
    features: torch.Tensor, eps: float = 1e-8, all_gather: Gather = no_gather
) -> torch.Tensor:
    """``-1/B sum_i log(||x_i - x_nn(i)|| + eps)`` over this rank's B rows, ``x = x / ||x||``.

    ``nn(i)`` is the row of largest inner product with ``x_i`` (on the sphere, the nearest)
    among all gathered rows but ``x_i`` itself, found without gradient; the distance is
    ``torch.nn.PairwiseDistance(eps=eps)``'s (``eps`` added to the difference, so a duplicate
    row costs ``-log(eps sqrt(D))``, not infinity), in fp32 with autocast off, as dinov2.

    The mean of the per-rank values over ranks equals the loss of one process holding the
    whole batch when every rank holds the same B; its gradients do too (divided by the number
    of ranks, as DDP averages) if ``all_gather`` is differentiable, as
    ``torch.distributed.nn.functional.all_gather`` is: the neighbour's side of each distance
    then reaches the rank that owns the neighbour.

    Args:
        features: ``(B, D)``, one crop's student CLS features (before the head), B >= 1 and
            at least 2 rows over all ranks.
        eps: of the normalisation, the distance and the log (dinov2: 1e-8 for all three).
        all_gather: maps this rank's ``(B, D)`` normalised rows to ``(B_all, D)``, the rows
            of all ranks concatenated, and the index of this rank's first row in it.

    Returns:
        The scalar loss, fp32.
    """
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        pool, offset = all_gather(x)
        if pool.shape[0] < 2:
            raise ValueError("KoLeo needs at least 2 rows over all ranks")
        with torch.no_grad():
            dots = x @ pool.T  # (B, B_all); inner product on the sphere: larger is nearer
            own = torch.arange(x.shape[0], device=x.device)
            dots[own, offset + own] = float("-inf")  # a row is never its own neighbour
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, pool[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


class KoLeoLoss(nn.Module):
    """``koleo_loss`` as a module; ``all_gather`` (local by default) is injected.

    Apply it to one crop at a time (dinov2 sums it over the two global crops: two crops of an
    image are not to be pushed apart).

    Args:
        eps: see ``koleo_loss``.
        all_gather: see ``koleo_loss``; ``no_gather`` for the local version.
    """

    def __init__(self, eps: float = 1e-8, all_gather: Gather = no_gather) -> None:
        super().__init__()
        self.eps = eps
        self.all_gather = all_gather

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` features to the scalar loss."""
        return koleo_loss(features, self.eps, self.all_gather)
