"""Full images as crop sources for :class:`dino_core.augment.batched.BatchedMultiCrop`.

The canvas path (:func:`dino_core.augment.canvas.decode_to_canvas`) cuts every image to a
centred square, so the sides of non-square images are never seen. Here a batch of encoded
images is decoded on the training device (:func:`decode_images`: one batched nvJPEG call on
CUDA), padded into one uint8 batch with each image's real size (:func:`pad_batch`), and
:class:`BatchedMultiCrop` draws each image's boxes on its own size and aspect ratio, as
RandomResizedCrop on the full image does. :func:`full_image_views` chains the three.

Decoding routes: JPEGs (magic bytes ``FF D8 FF``) whose header says 8-bit RGB or greyscale
go to torchvision's decoder (batched ``decode_jpeg`` on CUDA, ``decode_image`` on the CPU);
everything else (PNG, WebP, CMYK or Adobe JPEGs, anything the fast decoder rejects) goes to
Pillow through :func:`dino_core.data.folder.load_rgb`, which handles CMYK, 16-bit, alpha and
EXIF, then to the device. An image neither can read becomes ``None``, logged as a warning.

EXIF orientation: nvJPEG ignores it (torchvision's ``apply_exif_orientation`` is CPU-only), so
the orientation tag is read from the header with Pillow (``Image.open`` parses the markers
without decoding: ~35 us for a 12 MP photo) and applied on the device as flips and a
transpose (:func:`apply_exif_orientation`), the same on CPU and CUDA, matching Pillow's
``ImageOps.exif_transpose`` as :func:`load_rgb` does. The same header gives the pixel count,
so decompression bombs never reach nvJPEG (Pillow's fallback then rejects them).

torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they still work.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import torch
import torchvision.io as tio
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dino_core.augment.batched import BatchedMultiCrop
from dino_core.data.folder import MAX_PIXELS, load_rgb

logger = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
FAST_MODES = frozenset({"RGB", "L"})  # JPEG colour modes torchvision decodes as Pillow does
ORIENTATION_TAG = 0x0112
# EXIF orientation -> (transpose first?, then flip these dims), as ImageOps.exif_transpose
_ORIENT: dict[int, tuple[bool, tuple[int, ...]]] = {
    1: (False, ()),
    2: (False, (-1,)),  # mirrored
    3: (False, (-2, -1)),  # rotated 180
    4: (False, (-2,)),  # upside-down mirror
    5: (True, ()),  # transposed
    6: (True, (-1,)),  # stored rotated 90 counter-clockwise: turn it clockwise
    7: (True, (-2, -1)),  # transversed
    8: (True, (-2,)),  # stored rotated 90 clockwise: turn it counter-clockwise
}


def apply_exif_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turns ``(..., h, w)`` pixels stored with EXIF ``orientation`` (1-8) upright.

    Unknown values leave the image as it is (as Pillow does).
    """
    transpose, flips = _ORIENT.get(orientation, (False, ()))
    if transpose:
        image = image.transpose(-2, -1)
    return (image.flip(flips) if flips else image).contiguous()


def limit_short_side(image: torch.Tensor, max_short_side: int | None) -> torch.Tensor:
    """Downscales uint8 ``(3, h, w)`` so its shorter side is ``max_short_side``, aspect kept
    (long side as ``torchvision.transforms.Resize``: truncated), bicubic and antialiased like
    :func:`decode_to_canvas`, on the image's device. Smaller images are returned as they are.
    """
    if max_short_side is None or min(image.shape[-2:]) <= max_short_side:
        return image
    bicubic = TF.InterpolationMode.BICUBIC
    return TF.resize(image, [max_short_side], interpolation=bicubic, antialias=True)


def _probe(data: bytes) -> tuple[str, int, int] | None:
    """``(mode, pixels, orientation)`` from a JPEG's header, or None if Pillow cannot parse it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            try:
                orientation = int(image.getexif().get(ORIENTATION_TAG, 1))
            except Exception:  # a broken EXIF block: keep the pixels as stored (load_rgb too)
                orientation = 1
            return image.mode, image.width * image.height, orientation
    except Exception:
        return None


def _pillow(data: bytes, device: torch.device, max_short_side: int | None) -> torch.Tensor:
    image = load_rgb(io.BytesIO(data), size_hint=max_short_side)
    return TF.pil_to_tensor(image).to(device)


def _fast_decode(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decodes JPEGs with torchvision: one nvJPEG batch on CUDA (one by one if the batch
    fails, as it returns nothing then), ``decode_image`` on the CPU; None where it fails."""
    rgb = tio.ImageReadMode.RGB
    if device.type == "cuda":
        try:
            return list(tio.decode_jpeg(jpegs, mode=rgb, device=device))
        except Exception as error:
            logger.debug("batched nvJPEG decode failed (%s); decoding one by one", error)
    out: list[torch.Tensor | None] = []
    for data in jpegs:
        try:
            if device.type == "cuda":
                out.append(tio.decode_jpeg(data, mode=rgb, device=device))
            else:
                out.append(tio.decode_image(data, mode=rgb).to(device))
        except Exception:
            out.append(None)
    return out


def decode_images(
    encoded: Sequence[torch.Tensor],
    device: torch.device | str = "cpu",
    max_short_side: int | None = None,
) -> list[torch.Tensor | None]:
    """Decodes a batch of encoded images onto ``device``, upright and RGB.

    Args:
        encoded: 1-D uint8 CPU tensors of file bytes (any format Pillow reads).
        device: Where the images go; on CUDA, JPEGs are decoded there in one nvJPEG batch.
        max_short_side: If given, an image whose shorter side is larger is downscaled on the
            device (:func:`limit_short_side`); this bounds memory and padding, and keeps
            crop resampling (bilinear, no antialiasing) from shrinking by much.

    Returns:
        One entry per input: uint8 ``(3, h, w)`` on ``device``, or None if unreadable.
    """
    device = torch.device(device)
    raw = [t.detach().cpu().contiguous().numpy().tobytes() for t in encoded]
    fast, orientation = [], {}
    for i, data in enumerate(raw):
        header = _probe(data) if data.startswith(JPEG_MAGIC) else None
        if header is not None and header[0] in FAST_MODES and header[1] <= MAX_PIXELS:
            fast.append(i)
            orientation[i] = header[2]
    out: list[torch.Tensor | None] = [None] * len(raw)
    if fast:
        jpegs = [encoded[i].detach().cpu().contiguous() for i in fast]
        for i, image in zip(fast, _fast_decode(jpegs, device)):
            if image is not None:
                out[i] = apply_exif_orientation(image, orientation[i])
    for i, data in enumerate(raw):
        if out[i] is None:
            try:
                out[i] = _pillow(data, device, max_short_side)
            except Exception as error:
                logger.warning("image %d of the batch is unreadable, dropped: %r", i, error)
    return [None if x is None else limit_short_side(x, max_short_side) for x in out]


def pad_batch(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks images of different sizes into one batch, each top-left aligned.

    The padding repeats each image's last column and row, so a bilinear tap just outside an
    image's box reads its own edge pixel (as ``padding_mode="border"`` on it alone), never
    another image's pixels or zeros.

    Args:
        images: ``(3, h_i, w_i)`` tensors of one dtype on one device.

    Returns:
        ``(batch, sizes)``: ``(B, 3, H_max, W_max)`` of the images' dtype and device, and
        int64 ``(B, 2)`` on the CPU: each image's ``(h_i, w_i)``.
    """
    if not images:
        raise ValueError("pad_batch needs at least one image")
    if any(x.ndim != 3 or x.shape[0] != 3 or 0 in x.shape for x in images):
        raise ValueError(f"expected (3, h, w) images, got {[tuple(x.shape) for x in images]}")
    sizes = torch.tensor([tuple(x.shape[-2:]) for x in images], dtype=torch.int64)
    height, width = sizes.max(dim=0).values.tolist()
    batch = images[0].new_empty(len(images), 3, height, width)
    for out, image in zip(batch, images):
        h, w = image.shape[-2:]
        out[:, :h, :w] = image
        out[:, :h, w:] = image[:, :, w - 1 :]  # broadcasts the last column to the right
        out[:, h:] = out[:, h - 1 : h]  # and the last row (with its padding) downwards
    return batch, sizes


def full_image_views(
    aug: BatchedMultiCrop,
    encoded: Sequence[torch.Tensor],
    device: torch.device | str,
    generator: torch.Generator | None = None,
    max_short_side: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All multi-crop views of a batch of encoded images, boxes drawn on each full image.

    Decodes (:func:`decode_images`), drops unreadable images, pads the rest
    (:func:`pad_batch`) and calls ``aug`` with their sizes. Padding costs memory when a
    batch mixes aspect ratios (a portrait and a landscape photo pad to a square of the long
    side); ``max_short_side`` bounds it.

    Args:
        aug: The augmentation.
        encoded: 1-D uint8 CPU tensors of file bytes, one per image.
        device: Where decoding and augmentation run.
        generator: A CPU generator for the augmentation's draws (decoding draws nothing).
        max_short_side: Downscale images whose shorter side is larger (about 8/7 of
            ``aug.global_size`` matches the canvas path's scale); None keeps full resolution.

    Returns:
        ``(views, kept)``: ``views`` as :meth:`BatchedMultiCrop.__call__` for the ``K``
        readable images, in input order (``(K, 3, S, S)`` each, ``K`` possibly 0), and
        ``kept``, bool ``(len(encoded),)`` on the CPU, True where an image was readable (to
        select the matching labels or indices).
    """
    decoded = decode_images(encoded, device, max_short_side)
    kept = torch.tensor([x is not None for x in decoded], dtype=torch.bool)
    images = [x for x in decoded if x is not None]
    if not images:
        sides = [aug.global_size] * 2 + [aug.local_size] * aug.n_local
        return [torch.empty(0, 3, s, s, device=device) for s in sides], kept
    batch, sizes = pad_batch(images)
    return aug(batch, generator, sizes=sizes), kept
