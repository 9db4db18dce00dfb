"""Optimisation helpers: AdamW parameter groups, per-parameter clipping, last-layer freezing."""

from __future__ import annotations

import torch
from torch import nn

# parameters that sit below the first block, as dinov2's ``get_vit_lr_decay_rate`` lists them
_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token",
                    "register_tokens")


def layer_id(name: str, n_blocks: int) -> int:
    """The depth of a parameter for layer-wise lr decay (dinov2's ``get_vit_lr_decay_rate``):
    0 for the embeddings and the mask token, ``i + 1`` for block ``i``, ``n_blocks + 1`` for
    everything above (final norm, heads)."""
    if any(key in name for key in _EMBEDDING_NAMES):
        return 0
    if "blocks." in name:
        return int(name.split("blocks.", 1)[1].split(".", 1)[0]) + 1
    return n_blocks + 1


def param_groups(
    model: nn.Module, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict]:
    """AdamW groups: weights with weight decay, biases/norm parameters (ndim <= 1) without.

    Every group has an ``lr_multiplier`` and a ``wd_multiplier`` (1 or 0) that the step
    applies to the scheduled lr and weight decay (``set_schedule_values``). With
    ``layer_decay`` < 1 (dinov2: 0.9) a parameter at depth ``l`` of ``L`` blocks gets
    ``layer_decay ** (L + 1 - l)`` (``layer_id``; the heads 1), and the patch embedding also
    ``patch_embed_lr_mult`` (dinov2: 0.2); parameters of equal multipliers share a group.
    With both at 1 these are DINO v1's two groups.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    blocks = getattr(getattr(model, "backbone", model), "blocks", None)
    if layer_decay != 1.0 and blocks is None:
        raise ValueError("layer-wise lr decay needs a ViT backbone (blocks.<i>); use 1.0")
    n_blocks = len(blocks) if blocks is not None else 0
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if name.endswith(".bias") or p.ndim <= 1 else 1.0
        lr = 1.0
        if layer_decay != 1.0:
            lr = layer_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
        if "patch_embed" in name:
            lr *= patch_embed_lr_mult
        groups.setdefault((lr, wd), []).append(p)
    if not groups:  # nothing trainable: AdamW still wants a group
        groups[(1.0, 1.0)] = []
    # decayed groups first, so that DINO v1's groups keep their order (weights, then the rest)
    order = sorted(groups, key=lambda k: (-k[1], -k[0]))
    return [{"params": groups[k], "lr_multiplier": k[0], "wd_multiplier": k[1],
             **({"weight_decay": 0.0} if k[1] == 0.0 else {})} for k in order]


def set_schedule_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """This step's lr and weight decay on every group, times the group's multipliers
    (groups of checkpoints written before the multipliers existed: lr x 1, weight decay on
    the first group only, as then)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr * group.get("lr_multiplier", 1.0)
        if group.get("wd_multiplier", 1.0 if i == 0 else 0.0):
            group["weight_decay"] = weight_decay * group.get("wd_multiplier", 1.0)


def build_optimizer(model: nn.Module, fused: bool | None = None, layer_decay: float = 1.0,
                    patch_embed_lr_mult: float = 1.0) -> torch.optim.AdamW:
    """AdamW as in the paper; lr and weight decay are set per step from the schedules (and
    the groups' multipliers, see ``param_groups``)."""
    groups = param_groups(model, layer_decay, patch_embed_lr_mult)
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
