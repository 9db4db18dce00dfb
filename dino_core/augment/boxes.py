"""RandomResizedCrop's box sampler, vectorised over many crops, each on its own image size.

torchvision's ``RandomResizedCrop.get_params`` draws one box per call in a Python loop of up
to 10 tries. Here all crops draw their tries at once: :func:`sample_boxes_sized` for crops of
images of different sizes (full images padded into one batch), :func:`sample_boxes` for crops
of one fixed size (the square canvas). Both share one implementation and draw the same
numbers in the same order, so a seed gives the same boxes whichever is called.
"""

from __future__ import annotations

import math

import torch

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


def sample_boxes_sized(
    sizes: torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
    ratio: tuple[float, float] = RATIO,
    tries: int = 10,
) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` for ``n`` crops at once, crop ``i`` cut from an image
    of size ``sizes[i]``, on the CPU.

    Each crop draws ``tries`` candidates (area fraction of its own image uniform in ``scale``,
    log aspect ratio uniform in ``log(ratio)``) and keeps the first that fits in its image; if
    none fits it falls back to torchvision's centre crop of its image, clamped to ``ratio``.

    Draw order (part of the reproducibility contract): ``(n, tries)`` area fractions, then
    ``(n, tries)`` log ratios, then ``(n, 2)`` uniforms for the top and left offsets, all
    float64 from ``generator``; none of it depends on ``sizes``.

    Args:
        sizes: int64 ``(n, 2)``: ``(height, width)`` of the image each crop is cut from.
        scale: Range of the area fraction.
        generator: A CPU generator; ``None`` uses torch's default.
        ratio: Range of the aspect ratio ``w / h``.
        tries: Candidates per crop before the fallback (torchvision: 10).

    Returns:
        int64 ``(n, 4)``: ``(top, left, height, width)`` per crop, in pixels of its image.
    """
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"expected sizes (n, 2), got {tuple(sizes.shape)}")
    n = sizes.shape[0]
    height, width = sizes.long().cpu().unbind(dim=1)
    area = (height * width).double().view(-1, 1)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    s = torch.empty(n, tries, dtype=torch.float64).uniform_(*scale, generator=generator)
    r = torch.empty(n, tries, dtype=torch.float64).uniform_(log_lo, log_hi, generator=generator)
    w = torch.sqrt(area * s * r.exp()).round().long()
    h = torch.sqrt(area * s / r.exp()).round().long()
    hi_h, hi_w = height.view(-1, 1), width.view(-1, 1)
    valid = (w > 0) & (w <= hi_w) & (h > 0) & (h <= hi_h)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first max
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # torchvision's fallback: the whole image, cut down to the nearest allowed ratio
    in_ratio = width.double() / height.double()
    fw = torch.where(in_ratio > ratio[1], (height.double() * ratio[1]).round().long(), width)
    fh = torch.where(in_ratio < ratio[0], (width.double() / ratio[0]).round().long(), height)
    fits = valid.any(dim=1)
    w, h = torch.where(fits, w, fw), torch.where(fits, h, fh)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(fits, (u[:, 0] * (height - h + 1)).floor().long(), (height - h) // 2)
    left = torch.where(fits, (u[:, 1] * (width - w + 1)).floor().long(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def sample_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
    ratio: tuple[float, float] = RATIO,
    tries: int = 10,
) -> torch.Tensor:
    """:func:`sample_boxes_sized` for ``n`` crops of one ``height x width`` image size.

    Returns:
        int64 ``(n, 4)``: ``(top, left, height, width)`` per crop, in pixels.
    """
    sizes = torch.tensor([[height, width]], dtype=torch.int64).expand(n, 2)
    return sample_boxes_sized(sizes, scale, generator, ratio, tries)
