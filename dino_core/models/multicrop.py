"""Backbone + head over a list of crops of several resolutions."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of equal-resolution crops and the head once on all.

    Crops of the same size are concatenated along the batch, so a step with 2 global 224 crops
    and 10 local 96 crops makes two backbone calls and one head call. Output rows follow the
    input order: ``out[i * B:(i + 1) * B]`` belongs to ``crops[i]``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor,
                split_last_layer: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Args: crops, a list of ``(B, 3, H_i, W_i)``. Returns ``(len(crops) * B, K)``; with
        ``split_last_layer``, ``(z, W)``: the l2-normalised bottleneck ``(len(crops) * B, d)``
        and the last layer's effective weight ``(K, d)`` (``z @ W.T`` are the scores), for a
        fused loss that never materialises the scores (``dino_core.losses.dino_chunked``). Both come
        out of this forward, so DDP sees every parameter used."""
        feats = self.features(crops)
        if split_last_layer:
            head: Any = self.head  # a DINOHead
            return head.bottleneck(feats), head.last_layer_weight()
        return self.head(feats)

    def features(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The backbone's features of every crop, ``(len(crops) * B, D)``, in crop order."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        return torch.cat([self.backbone(torch.cat(group))
                          for group in _runs_of_equal_size(crops)])


def _runs_of_equal_size(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    runs: list[list[torch.Tensor]] = []
    for crop in crops:
        if runs and runs[-1][0].shape[-2:] == crop.shape[-2:]:
            runs[-1].append(crop)
        else:
            runs.append([crop])
    return runs
