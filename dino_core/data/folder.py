"""Images from a local folder tree, optionally labelled by their first-level subfolder.

Real image dumps are messy: CMYK and 16-bit files, palettes with transparency, phone photos
stored sideways with an EXIF orientation tag, 50-megapixel scans, truncated downloads, HTML
error pages saved as ``.jpg``. :func:`load_rgb` turns all readable ones into 8-bit RGB and
:class:`ImageFolder` turns unreadable ones into ``None`` (dropped by
:func:`dino_core.data.collate.collate_multicrop`) instead of killing a multi-hour run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

# Pillow's own bomb limit (2 x its default MAX_IMAGE_PIXELS, ~179 MP), enforced here even if
# some other library has set Image.MAX_IMAGE_PIXELS = None to switch Pillow's check off.
MAX_PIXELS = 2 * 89_478_485


def _composite_on_black(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, (0, 0, 0))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB, scaling high bit depths instead of clipping."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG/TIFF (Pillow opens them as I;16 or I): 0..65535 -> 0..255. A 32-bit "I"
        # is assumed to hold 16-bit data too, which is what Pillow produces for it in practice.
        array = np.asarray(image).astype(np.float32)
        array = np.clip(array / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if mode == "F":
        # Float images have no standard range: [0, 1] if they fit, else min-max stretched.
        array = np.asarray(image, dtype=np.float32)
        lo, hi = float(array.min()), float(array.max())
        if lo < 0 or hi > 1:
            array = (array - lo) / max(hi - lo, 1e-12)
        return Image.fromarray((array * 255 + 0.5).astype(np.uint8)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        # Dropping alpha would expose whatever colour the encoder left under transparent
        # pixels; black is deterministic.
        return _composite_on_black(image)
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, ...


def load_rgb(path: str | os.PathLike | BinaryIO, size_hint: int | None = None) -> Image.Image:
    """Decodes one image file to an 8-bit RGB PIL image, upright.

    Args:
        path: A local file, or an open binary file object (e.g. ``io.BytesIO`` of a
            remote object).
        size_hint: If given, a JPEG may be decoded at a reduced scale (1/2, 1/4, 1/8, with
            libjpeg's draft mode) as long as both sides stay >= ``size_hint``: a 6000x4000 photo
            headed for 224 px crops decodes ~10x faster. Around 2x the crop size keeps local
            crops at full resolution.

    Returns:
        The decoded image in mode ``"RGB"``, EXIF orientation applied.

    Raises:
        Exception: Whatever Pillow raises for unreadable input (``OSError``,
            ``UnidentifiedImageError``, ``Image.DecompressionBombError``, ...).
    """
    with Image.open(path) as image:
        if image.width * image.height > MAX_PIXELS:
            raise Image.DecompressionBombError(
                f"{image.width}x{image.height} exceeds the {MAX_PIXELS}-pixel limit"
            )
        if size_hint is not None and image.format == "JPEG":
            image.draft("RGB", (size_hint, size_hint))
        image.load()
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block should not cost us the pixels
            upright = image.copy()
    return _to_rgb(upright)


def _scan(root: Path) -> list[Path]:
    """All image files under ``root`` (any depth, symlinks followed), sorted by relative path."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if is_image_name(name):
                found.append(Path(dirpath, name).relative_to(root))
    return sorted(found, key=lambda p: p.parts)


def is_image_name(name: str) -> bool:
    """A visible file with one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def label_by_first_folder(
    relative: list[tuple[str, ...]], folders: list[str]
) -> tuple[list[str], list[int]]:
    """``(classes, labels)`` for images at ``relative`` paths (as parts) under a root whose
    visible first-level folders are ``folders``.

    As torchvision's ``ImageFolder``: if every image lies inside a first-level folder, the
    classes are the sorted visible first-level folders, *including empty ones*, so the label
    of a class never depends on which others happen to have files; otherwise there are no
    classes and every label is -1 (plain unlabelled pretraining data).
    """
    if not relative or not all(len(parts) >= 2 for parts in relative):
        return [], [-1] * len(relative)
    classes = sorted({f for f in folders if not f.startswith(".")} | {p[0] for p in relative})
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[parts[0]] for parts in relative]


class ImageFiles(torch.utils.data.Dataset):
    """Images named by ``samples``, decoded by :func:`load_rgb`; an unreadable one gives
    ``None`` and is counted. Subclasses say where the files are (:meth:`open`).

    Attributes:
        samples: ``(path, label)`` per image, in sorted order.
        classes: Class names, index = label (empty: unlabelled).
        num_skipped: Unreadable files met so far *in this process* (each DataLoader worker
            has its own copy; the collate function reports skips per batch for that reason).
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        transform: Callable[[Image.Image], Any] | None = None,
        size_hint: int | None = None,
    ) -> None:
        self.samples, self.classes = samples, classes
        self.transform, self.size_hint = transform, size_hint
        self._skipped: set[str] = set()

    def open(self, path: str) -> str | BinaryIO:
        """What :func:`load_rgb` reads for ``path``: the path itself for local files."""
        return path

    @property
    def num_skipped(self) -> int:
        return len(self._skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        """Loads sample ``index``.

        Returns:
            ``(transform(image), label)``, or ``None`` if the file cannot be decoded.
        """
        path, label = self.samples[index]
        try:
            image = load_rgb(self.open(path), self.size_hint)
        except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ...)
            if path not in self._skipped:  # warn once per file, not once per epoch
                logger.warning(
                    "skipping unreadable image %s: %s: %s", path, type(exc).__name__, exc
                )
                self._skipped.add(path)
            return None
        # The transform runs outside the try: a bug there must fail loudly, not skip data.
        return (self.transform(image) if self.transform else image), label


class ImageFolder(ImageFiles):
    """Every image under a local ``root``; labelled by first-level folder when all images
    have one (:func:`label_by_first_folder`).

    Args:
        root: A local directory.
        transform: Applied to the RGB PIL image (e.g. ``MultiCropAugmentation``).
        size_hint: Passed to :func:`load_rgb` for fast decoding of large JPEGs.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        size_hint: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        relative = _scan(self.root)
        if not relative:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
        folders = [e.name for e in os.scandir(self.root) if e.is_dir()]
        classes, labels = label_by_first_folder([p.parts for p in relative], folders)
        samples = [(str(self.root / p), label) for p, label in zip(relative, labels)]
        super().__init__(samples, classes, transform, size_hint)
