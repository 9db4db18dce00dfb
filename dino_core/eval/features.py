"""Frozen-backbone feature extraction over a data loader."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``model`` on every batch ``(images (B, 3, H, W), labels (B,), n_skipped)`` (the
    ``collate_multicrop`` format) and returns ``(features (N, D) float32, labels (N,))``,
    l2-normalised by default."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    amp = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    feats, labels = [], []
    for images, y, *_ in loader:
        if images is None or len(y) == 0:
            continue
        with amp:
            f = model(images.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    if not feats:
        raise ValueError("no readable images in the evaluation split")
    out = torch.cat(feats)
    return (F.normalize(out, dim=1) if normalize else out), torch.cat(labels)
