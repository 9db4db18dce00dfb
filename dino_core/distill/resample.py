"""A patch grid resampled to another grid.

The student's and the teacher's grids differ when their patch sizes do (a ViT-S/16 student of
a ViT-B/8 teacher: 14 x 14 against 28 x 28 patches at 224 px, or a 7 x 7 ResNet map), or when
they see the crops at different sizes. The teacher's grid is resampled to the student's, not
the other way: each student token then gets exactly one target, and the resampling needs no
gradient. Bilinear with ``align_corners=False`` treats each token as the centre of its cell,
which is where a strided patch convolution (or a stride-32 ResNet map) puts it, so two grids
over the same image line up cell centre on cell centre. It does not antialias: shrinking a
grid by more than 2x samples it rather than averaging it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_patches(
    patches: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Bilinear resampling of ``(B, h * w, D)`` raster-order tokens to ``(B, h2 * w2, D)``.

    Args:
        patches: ``(B, N, D)`` with ``N = h * w``.
        grid: ``(h, w)``.
        new_grid: ``(h2, w2)``; equal to ``grid``, ``patches`` come back as they are.

    Returns:
        ``(B, h2 * w2, D)``, interpolated on the ``(B, D, h, w)`` view with
        ``align_corners=False``, in ``patches``' dtype.
    """
    b, n, d = patches.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h} x {w} grid")
    if tuple(new_grid) == (h, w):
        return patches
    image = patches.transpose(1, 2).reshape(b, d, h, w)
    out = F.interpolate(image, size=tuple(new_grid), mode="bilinear", align_corners=False)
    return out.flatten(2).transpose(1, 2)
