"""Backbone + head over a list of crops of several resolutions."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from dino_core.models.masked import backbone_tokens


class MaskedForward(NamedTuple):
    """What the DINOv2 recipe reads from one pass of a wrapper over crops with iBOT masks.

    ``cls``: ``(n_crops * B, D)`` backbone CLS features (KoLeo's input); ``out``: the head
    on them, ``(n_crops * B, K)``, or the l2-normalised bottleneck ``(n_crops * B, d)`` with
    ``split_last_layer``; ``weight``: the last layer's ``(K, d)`` then, else None;
    ``patches``: ``(n_masked_crops * B, N, D)`` patch tokens of the crops the masks cover
    (Gram anchoring's input); ``masked_out``: ``(M, K)``, the iBOT head (or the shared DINO
    head) on the M masked patches, in the order of ``masks.flatten().nonzero()``.
    """

    cls: torch.Tensor
    out: torch.Tensor
    weight: torch.Tensor | None
    patches: torch.Tensor
    masked_out: torch.Tensor


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of equal-resolution crops and the head once on all.

    Crops of the same size are concatenated along the batch, so a step with 2 global 224 crops
    and 10 local 96 crops makes two backbone calls and one head call. Output rows follow the
    input order: ``out[i * B:(i + 1) * B]`` belongs to ``crops[i]``.

    For the DINOv2 recipe it may also hold iBOT's learned ``mask_token`` ``(1, D)`` (zeros at
    first, as dinov2's) and a separate iBOT head ``ibot_head`` (None: the DINO head serves
    both); both are parameters of the wrapper, so they are in its state dict, the EMA lists
    and the checkpoint, and absent (the DINO v1 state dict) when not asked for.
    """

    ibot_head: nn.Module | None

    def __init__(self, backbone: nn.Module, head: nn.Module, mask_token: bool = False,
                 ibot_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        if mask_token:
            dim = int(backbone.embed_dim)  # type: ignore[arg-type]
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.ibot_head = ibot_head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor, split_last_layer: bool = False,
                masks: torch.Tensor | None = None, mask_inputs: bool = True,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | MaskedForward:
        """Args: crops, a list of ``(B, 3, H_i, W_i)``. Returns ``(len(crops) * B, K)``; with
        ``split_last_layer``, ``(z, W)``: the l2-normalised bottleneck ``(len(crops) * B, d)``
        and the last layer's effective weight ``(K, d)`` (``z @ W.T`` are the scores), for a
        fused loss that never materialises the scores (``dino_core.losses.dino_chunked``). Both come
        out of this forward, so DDP sees every parameter used.

        With ``masks`` (``(n * B, N)`` bool over the first n crops, crop-major), a
        ``MaskedForward`` (see ``forward_masked``)."""
        if masks is not None:
            if isinstance(crops, torch.Tensor):
                crops = [crops]
            return self.forward_masked(crops, masks, mask_inputs, split_last_layer)
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


    def forward_masked(self, crops: list[torch.Tensor], masks: torch.Tensor,
                       mask_inputs: bool = True, split_last_layer: bool = False) -> MaskedForward:
        """The recipe's pass: the first ``n = len(masks) // B`` crops (the global ones, of one
        size) through ``backbone_tokens`` with their masked patches replaced by ``mask_token``
        (the student) or left as they are (``mask_inputs=False``: the teacher, which reads
        its outputs at the same places), the other crops through ``features``; the heads
        once on the CLS features and once on the masked patches (one call when shared, so a
        BN head sees them together, as dinov2 concatenates them).

        Args:
            crops: ``[global_1, ..., local_1, ...]``, each ``(B, 3, H_i, W_i)``.
            masks: ``(n * B, N)`` bool; may stay on the CPU (the indices are made there, so
                nothing waits on the device).
            mask_inputs: replace the masked patches' embeddings.
            split_last_layer: ``out`` is the bottleneck and ``weight`` the last layer (the
                masked patches still get full scores).
        """
        batch = crops[0].shape[0]
        n_masked = masks.shape[0] // batch
        if n_masked < 1 or masks.shape[0] % batch:
            raise ValueError(f"masks {tuple(masks.shape)} do not cover whole crops of {batch}")
        # without iBOT (KoLeo or Gram alone) there is no token and nothing is replaced
        token = getattr(self, "mask_token", None) if mask_inputs else None
        cls, patches = backbone_tokens(self.backbone, torch.cat(crops[:n_masked]),
                                       masks if token is not None else None, token)
        if len(crops) > n_masked:
            cls = torch.cat([cls, self.features(crops[n_masked:])])
        where = masks.flatten().nonzero().flatten().to(patches.device, non_blocking=True)
        picked = patches.flatten(0, 1).index_select(0, where)  # (M, D)
        head: Any = self.head
        weight = None
        if self.ibot_head is not None:
            out = head.bottleneck(cls) if split_last_layer else head(cls)
            masked_out = self.ibot_head(picked)
        else:
            both = torch.cat([cls, picked])
            if split_last_layer:
                z = head.bottleneck(both)
                out, masked_out = z[: len(cls)], head.last_layer(z[len(cls):])
            else:
                out, masked_out = head(both).split([len(cls), len(picked)])
        if split_last_layer:
            weight = head.last_layer_weight()
        return MaskedForward(cls, out, weight, patches, masked_out)


def _runs_of_equal_size(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    runs: list[list[torch.Tensor]] = []
    for crop in crops:
        if runs and runs[-1][0].shape[-2:] == crop.shape[-2:]:
            runs[-1].append(crop)
        else:
            runs.append([crop])
    return runs
