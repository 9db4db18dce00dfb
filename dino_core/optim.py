"""Optimisation helpers: AdamW parameter groups, per-parameter clipping, last-layer freezing."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights with weight decay, and biases/norm parameters (ndim <= 1) without.

    The first group's ``weight_decay`` is rewritten every step from the schedule.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias") or p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW as in the paper; lr and weight decay are set per step from the schedules."""
    groups = param_groups(model)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    use_fused = on_cuda if fused is None else fused
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, fused=use_fused or None)


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Caps each parameter's gradient norm at ``clip`` separately (the reference's
    ``clip_gradients``), with multi-tensor kernels instead of a host sync per parameter.

    Returns:
        The per-parameter gradient norms before clipping, ``(n_params_with_grad,)``.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
    return torch.stack(norms)


def cancel_last_layer_gradients(model: nn.Module) -> None:
    """Drops the gradients of the head's last layer; the paper freezes it during the first
    epoch because it makes training more stable (Appendix)."""
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
