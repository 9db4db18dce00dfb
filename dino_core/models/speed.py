"""Speed levers that leave the math alone: compiled ViT blocks, channels-last ResNets."""

from __future__ import annotations

import torch
from torch import nn

from dino_core.models.backbone import is_rope_vit, is_vit


def compile_backbone(backbone: nn.Module, mode: str | None = None) -> nn.Module:
    """Compiles a backbone in place with ``torch.compile``; parameter names do not change, so
    checkpoints, DDP and the EMA see the same module.

    A ViT's stack of blocks is compiled as one graph per sequence length: the blocks hold
    nearly all the FLOPs, while the position-embedding resampling (antialiased bicubic, whose
    backward inductor cannot trace in torch 2.14) stays eager. The stack is a ``Sequential``
    subclass with its own loop: compiling timm's ``nn.Sequential`` (or each block) made
    dynamo compile every block's frame separately under torch 2.11, where the blocks'
    different drop-path rates are guarded constants, so each block recompiled and the
    8-recompile limit left the rest eager (seen on an H100).
    A RoPE ViT (DINOv3's ``Eva``) passes the rotary table to each block, so its blocks are
    compiled one by one (their drop-path rates are uniform, so one graph serves them all).
    A ResNet is compiled whole, after switching it to channels-last. ``mode``: torch.compile's
    (``"reduce-overhead"``: CUDA graphs, the step's Python gaps gone once shapes are static).
    """
    if is_rope_vit(backbone):
        for block in backbone.blocks:  # type: ignore[union-attr]
            block.compile(mode=mode)  # type: ignore[operator]
        return backbone
    if is_vit(backbone):
        blocks = _Blocks(*backbone.blocks)  # type: ignore[union-attr,misc]
        blocks.compile(mode=mode)
        backbone.blocks = blocks
        return backbone
    backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    backbone.compile(mode=mode)
    return backbone


class _Blocks(nn.Sequential):
    """The same modules under the same names (``blocks.0...``), with a loop dynamo traces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x)
        return x
