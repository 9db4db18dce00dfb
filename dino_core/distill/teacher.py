"""The frozen teacher of distillation, and the fingerprint of its weights.

The teacher is a large pretrained backbone (ours, the reference DINO's, Meta's DINOv2/v3)
that is never trained: it stays in eval mode (``train()`` cannot switch it back, so a caller
that puts a whole model tree in training mode cannot turn on its dropout or move a
BatchNorm's running statistics), its parameters do not require gradients, and its forward
runs under ``torch.no_grad`` (in bf16 on CUDA, where a ViT-L/g teacher would otherwise cost
most of the step). It is never in the optimizer and its weights are not saved with the
student's checkpoints; ``parameter_sha256`` is, so a resumed or audited run can show that it
distilled from these weights and that they never moved.

With a DINO head (``head``; the teacher's training checkpoint must hold it) it also gives the
head's scores on its CLS feature, the targets of DINO distillation.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from dino_core.distill.tokens import backbone_features
from dino_core.interop.export import load_backbone


class TeacherOutput(NamedTuple):
    """The teacher on B images: ``cls`` ``(B, D_t)``, ``patches`` ``(B, h * w, D_t)`` on the
    ``grid`` ``(h, w)``, and ``out`` ``(B, K)``, its DINO head's scores (None without a head);
    all fp32."""

    cls: torch.Tensor
    patches: torch.Tensor
    grid: tuple[int, int]
    out: torch.Tensor | None


class FrozenTeacher(nn.Module):
    """A backbone (and optionally its DINO head) that is never trained.

    Args:
        backbone: a timm ViT (any patch size, DINO/DINOv2/DINOv3) or a torchvision ResNet-50
            (its last feature map serves as the patch grid: ``dino_core.distill.tokens``).
        head: the teacher's DINO head (a ``DINOHead``), for DINO distillation; None for
            feature distillation only.
        bf16_on_cuda: run the forward under bf16 autocast on CUDA (outputs are cast to fp32).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None,
                 bf16_on_cuda: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.bf16_on_cuda = bf16_on_cuda
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """The teacher's read-outs of ``images`` ``(B, 3, H, W)``, without gradient."""
        on_cuda = images.device.type == "cuda" and self.bf16_on_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext():
            tokens = backbone_features(self.backbone, images)
            out = self.head(tokens.cls) if self.head is not None else None
        return TeacherOutput(tokens.cls.float(), tokens.patches.float(), tokens.grid,
                             out.float() if out is not None else None)

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)  # type: ignore[arg-type]

    def sha256(self) -> str:
        """``parameter_sha256`` of the teacher (backbone and head)."""
        return parameter_sha256(self)


def load_teacher(path: str | Path, which: str = "teacher", head: nn.Module | None = None,
                 bf16_on_cuda: bool = True) -> FrozenTeacher:
    """The frozen teacher of a local backbone file: ours (``.safetensors``), the reference
    DINO code's or Meta's DINOv2/v3 (``.pth``), read by ``dino_core.interop.export.load_backbone``
    (remote URIs and run folders are the service's to fetch).

    Args:
        which: ``teacher`` or, of a reference training checkpoint, ``student``.
        head: the DINO head to go with it (the file holds only the backbone).
    """
    return FrozenTeacher(load_backbone(path, which), head, bf16_on_cuda)


def parameter_sha256(module: nn.Module) -> str:
    """A SHA-256 of ``module``'s state dict (parameters and buffers): every entry's name,
    dtype, shape and bytes, in sorted name order, so the same weights give the same hex digest
    on any device, in any process."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
