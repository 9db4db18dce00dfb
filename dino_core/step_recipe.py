"""One training step of the DINOv2/DINOv3 recipe (Oquab et al. 2024, Sec. 4; dinov2's
``SSLMetaArch.forward_backward``), in DINO v1's ``train_one_epoch`` order: teacher on the
global crops, student on all crops with the global ones masked, the recipe's losses,
backward, clip, freeze the last layer, optimizer step, EMA (and the Gram teacher's
snapshot, a function of the global step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dino_core.monitors import teacher_stats
from dino_core.optim import set_schedule_values
from dino_core.recipe import GramAnchor, RecipeLoss
from dino_core.step import StepConfig, StepOutput, agree_on_loss, autocast, backward_and_update


def train_step_recipe(
    *,
    student: nn.Module,
    teacher: nn.Module,
    losses: RecipeLoss,
    optimizer: torch.optim.Optimizer,
    crops: Sequence[torch.Tensor],
    masks: torch.Tensor,
    values: dict[str, float],
    step: int,
    freeze_last_layer: bool,
    ema_params: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
    cfg: StepConfig,
    gram: GramAnchor | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_module: nn.Module | None = None,
) -> StepOutput:
    """As ``train_step``, with the recipe's terms (``RecipeLoss``); ``stats`` also holds each
    weighted term (``loss_dino``, ``loss_ibot``, ``loss_koleo``, ``loss_gram``).

    Args:
        losses: the recipe's losses (the DINO and iBOT centers inside).
        masks: ``(n_global * B, N)`` bool iBOT masks of the global crops, crop-major, on the
            CPU (all False without iBOT).
        gram: the Gram teacher, when anchoring is on.
        the rest: see ``train_step``.
    """
    set_schedule_values(optimizer, values["lr"], values["weight_decay"])
    if gram is not None and gram.refresh_due(step):
        gram.refresh(teacher.get_submodule("backbone"))
    temp, n_global = values["teacher_temp"], cfg.n_global
    global_crops = list(crops[:n_global])
    with autocast(crops[0].device.type, cfg):
        with torch.no_grad():
            # only the global views pass through the teacher, unmasked, read at the masks
            t = teacher(global_crops, masks=masks, mask_inputs=False)
            w = gram.weight(step) if gram is not None else 0.0
            anchor = (w, gram.patches(torch.cat(global_crops))) if gram and w > 0 else None
        stats = teacher_stats(t.out, losses.dino.center, temp)
        s = student(list(crops), split_last_layer=cfg.fused_head_loss, masks=masks)
        terms = losses(s, t, masks, temp, n_global, anchor)
        loss = torch.stack(list(terms.values())).sum()

    global_loss, finite = agree_on_loss(loss, optimizer, step, cfg)
    losses.update_centers(t, keep_if=finite if cfg.defer_nonfinite_check else None)
    backward_and_update(loss, clip_module if clip_module is not None else student, optimizer,
                        values["momentum"], freeze_last_layer, ema_params, cfg, scaler, finite)
    stats |= {f"loss_{name}": term.detach() for name, term in terms.items()}
    return StepOutput(loss_tensor=global_loss, finite=finite, stats=stats)
