"""Batching for multi-crop samples, tolerant of unreadable files.

``ImageFolder`` returns ``None`` for a file it cannot decode; dropping those here (rather than
resampling another index in the dataset) keeps the dataset a pure index -> sample map, and the
per-batch skip count travels back from the DataLoader workers to the training loop, which is
the only process that sees every batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def collate_multicrop(
    batch: Sequence[tuple[Any, Any] | None],
) -> tuple[list[torch.Tensor] | torch.Tensor, torch.Tensor, int]:
    """Stacks ``(views, label)`` samples, dropping ``None`` ones.

    Args:
        batch: Samples from the dataset; each is ``None`` or ``(views, label)`` where ``views``
            is either a list of ``n_views`` tensors ``(3, H_i, W_i)`` (multi-crop training) or a
            single tensor ``(3, H, W)`` (evaluation transform), and ``label`` an int.

    Returns:
        ``(images, labels, num_skipped)``:

        - ``images``: a list of ``n_views`` tensors ``(B, 3, H_i, W_i)``, view ``i`` of every
          kept sample stacked together (the layout DINO's training step expects: all first
          global crops, then all second ones, ...); or one tensor ``(B, 3, H, W)`` when the
          samples hold a single tensor.
        - ``labels``: int64 tensor ``(B,)``.
        - ``num_skipped``: how many ``None`` samples were dropped.

        If every sample was ``None`` the result is ``([], torch.empty(0, dtype=torch.long), n)``:
        callers detect it with ``labels.numel() == 0`` and skip the step.

    Raises:
        ValueError: If the kept samples do not all have the same number of views.
    """
    kept = [item for item in batch if item is not None]
    num_skipped = len(batch) - len(kept)
    if not kept:
        return [], torch.empty(0, dtype=torch.long), num_skipped
    labels = torch.as_tensor([int(label) for _, label in kept], dtype=torch.long)
    first = kept[0][0]
    if isinstance(first, torch.Tensor):
        return torch.stack([views for views, _ in kept]), labels, num_skipped
    n_views = len(first)
    if any(len(views) != n_views for views, _ in kept):
        raise ValueError(f"samples disagree on the number of views: {[len(v) for v, _ in kept]}")
    images = [torch.stack([views[i] for views, _ in kept]) for i in range(n_views)]
    return images, labels, num_skipped
