"""How a ViT's learned position table meets a crop of another size.

Two resamplings of an ``(1, [1 +] N, D)`` table (an ``s x s`` grid, ``N = s * s``) exist in
the released weights this project reads:

* ``reference_pos_embed``: the reference DINO ViT's ``interpolate_pos_encoding`` (bicubic, no
  antialiasing, by the scale factor ``(grid + 0.1) / s``). Meta's DINOv2 hub builds its
  plain models (``dinov2_vit*14``) with the same code (``interpolate_offset=0.1``,
  ``interpolate_antialias=False``), so their position tables resample the same way.
* ``timm_pos_embed``: timm's ``resample_abs_pos_embed`` (antialiased bicubic to the exact
  size). Meta's hub builds the register models (``dinov2_vit*14_reg``) with antialiasing and
  no offset, which is this.

``DinoVisionTransformer`` is timm's ``VisionTransformer`` with the first of the two.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

PosEmbedInterpolation = Literal["reference", "timm"]
POS_EMBED_INTERPOLATIONS: tuple[str, ...] = ("reference", "timm")


def reference_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The position table ``(1, 1 + N, D)`` (class token first, an ``N = s x s`` grid) for a
    ``rows x cols`` patch grid, as the reference DINO ViT's ``interpolate_pos_encoding``
    computes it: unchanged when the grid is the table's; else the patch part, as an
    ``(1, D, s, s)`` image, bicubic-interpolated (no antialiasing, ``align_corners=False``)
    by the scale factors ``((rows + 0.1) / s, (cols + 0.1) / s)``, the 0.1 making the floored
    output size ``rows x cols`` (dino issue #8); the scale factors themselves, not the
    output size, set the sampling positions (torch >= 1.6 semantics, as in the reference).

    The reference compares the image's pixel sides (``w == h``), this the grid's: they differ
    only for a non-square image whose square grid equals the table (e.g. 224 x 230 px at
    patch 16), which the reference resamples by a scale of 14.1 / 14 and this leaves alone.
    """
    n = pos_embed.shape[1] - 1
    if rows * cols == n and rows == cols:
        return pos_embed
    side = math.sqrt(n)
    s = int(side)
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, s, s, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                          mode="bicubic")
    if tuple(patch.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"interpolated position grid {tuple(patch.shape[-2:])} is not "
                           f"{(rows, cols)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], patch), dim=1)


class DinoVisionTransformer(VisionTransformer):
    """timm's ViT with the reference DINO position-table interpolation (same modules, same
    state dict; ``pos_embed_interpolation="timm"`` falls back to timm's own code)."""

    def __init__(self, *args: object, pos_embed_interpolation: PosEmbedInterpolation = "reference",
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(f"pos_embed_interpolation must be one of "
                             f"{', '.join(POS_EMBED_INTERPOLATIONS)}, got "
                             f"{pos_embed_interpolation!r}")
        self.pos_embed_interpolation = pos_embed_interpolation

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        table, cls = self.pos_embed, self.cls_token
        if (self.pos_embed_interpolation != "reference" or not self.dynamic_img_size
                or table is None or cls is None or self.reg_token is not None
                or self.no_embed_class):  # a layout the reference has no formula for
            return super()._pos_embed(x)
        b, rows, cols, c = x.shape  # dynamic_img_size: patch_embed keeps the (B, H, W, C) grid
        pos = reference_pos_embed(table, rows, cols)
        x = torch.cat((cls.expand(b, -1, -1), x.reshape(b, -1, c)), dim=1)
        return self.pos_drop(x + pos)


def timm_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int,
                   num_prefix_tokens: int = 1) -> torch.Tensor:
    """The table ``(1, num_prefix_tokens + s * s, D)`` at a ``rows x cols`` grid as timm's
    ``dynamic_img_size`` forward resamples it (antialiased bicubic to the exact size; the
    prefix entries, if any, unchanged)."""
    n = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(n)
    if (rows, cols) == (side, side):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=[rows, cols], old_size=[side, side],
                                  num_prefix_tokens=num_prefix_tokens)
