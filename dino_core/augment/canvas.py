"""Decoded images as fixed-size uint8 canvases (shorter side resized, then centre-cropped),
so a DataLoader can stack them for :class:`dino_core.augment.batched.BatchedMultiCrop`."""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image


def decode_to_canvas(image: Image.Image, size: int = 256) -> torch.Tensor:
    """A decoded image as a square uint8 canvas, so a DataLoader can stack a batch.

    The shorter side is resized to ``size`` (bicubic, antialiased), then the centre
    ``size x size`` is kept. :class:`BatchedMultiCrop` crops from this canvas, not from the
    full image: for non-square images the sides are lost, and crops of large photos are cut
    from a downscaled copy, both deviations from the reference. ``size`` 256 for 224 px global
    crops mirrors the usual ImageNet resize; a larger canvas keeps more detail for local crops.

    Args:
        image: A PIL image in any mode (converted to RGB).
        size: Side of the canvas.

    Returns:
        uint8 ``(3, size, size)``.
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    image = TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.pil_to_tensor(TF.center_crop(image, [size, size]))


class ToCanvas:
    """:func:`decode_to_canvas` as a dataset transform (picklable for DataLoader workers).

    Example:
        ``ProceduralShapes(n, transform=ToCanvas(256))`` or ``ImageFolder(root,
        transform=ToCanvas(256))`` with ``collate_multicrop`` yields uint8 ``(B, 3, 256, 256)``
        batches for :class:`BatchedMultiCrop`.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return decode_to_canvas(image, self.size)

    def __repr__(self) -> str:
        return f"ToCanvas(size={self.size})"
