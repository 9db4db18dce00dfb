"""Collapse monitors on the teacher's output (Caron et al. 2021, Sec. 5.3 and Fig. 7).

The two collapse modes: one dimension dominates (per-sample entropy -> 0 and the batch-mean
distribution becomes one-hot, its KL to uniform -> log K) and the uniform output (per-sample
entropy -> log K). Both numbers are cheap ``(B, K)`` reductions, returned as tensors so that
computing them every step costs no host sync.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def teacher_stats(
    teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> dict[str, torch.Tensor]:
    """Args:
        teacher_out: ``(n_global * B, K)`` raw teacher scores.
        center: ``(1, K)`` the center used for this step's targets.
        teacher_temp: tau_t of this step.

    Returns:
        ``teacher_entropy``: mean per-sample entropy of ``softmax((t - c) / tau)`` (nats);
        ``teacher_kl_uniform``: KL(batch-mean distribution || uniform) (nats).
    """
    logp = F.log_softmax((teacher_out.float() - center) / teacher_temp, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(dim=-1).mean()
    mean_p = p.mean(dim=0)
    k = teacher_out.shape[-1]
    kl_uniform = (mean_p * (mean_p.clamp_min(1e-12).log() + math.log(k))).sum()
    return {"teacher_entropy": entropy, "teacher_kl_uniform": kl_uniform}
