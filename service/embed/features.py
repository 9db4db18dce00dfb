"""The forward of an embedding: CLS, CLS + mean patch token, or the patch grid."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def embed_batch(model: nn.Module, x: torch.Tensor, features: str) -> torch.Tensor:
    """Features of normalised images ``x (B, 3, S, S)``.

    Returns:
        ``cls``: ``(B, D)``, ``F.normalize(model(x))`` as ``dino_core.eval.extract_features``
        computes it for k-NN; ``cls+mean``: ``(B, 2 * D)``, the pooled output
        (``forward_head``, the same as ``model(x)``) and the mean of the patch tokens,
        concatenated and l2-normalised; ``patch``: ``(B, h * w, D)``, the patch tokens of the
        last block after the final norm (``dino_core.models.vit_features.patch_tokens``).
        float32 on ``x``'s device.
    """
    if features == "cls":
        return F.normalize(model(x).float(), dim=1)
    vit: Any = model
    tokens = vit.forward_features(x)
    patches = tokens[:, vit.num_prefix_tokens:]
    if features == "patch":
        return patches.float()
    pooled = vit.forward_head(tokens)
    return F.normalize(torch.cat([pooled, patches.mean(dim=1)], dim=1).float(), dim=1)
