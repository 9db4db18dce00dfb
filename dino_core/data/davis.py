"""The DAVIS 2017 folder layout: reading a local copy, and writing any video set in it.

Layout (as ``davis-2017/DAVIS`` unpacks)::

    ImageSets/2017/<split>.txt            one video name a line
    JPEGImages/480p/<video>/00000.jpg     RGB frames, in name order
    Annotations/480p/<video>/00000.png    palette PNGs, pixel value = instance id (0 background)

The palette is the PASCAL VOC colour map DAVIS uses (the reference script downloads the same
table from UVC), so the written masks open in DAVIS tools and viewers alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from dino_core.data.video import Video

RESOLUTION = "480p"


def davis_palette() -> np.ndarray:
    """The 256-colour PASCAL VOC / DAVIS palette ``(256, 3)`` uint8 (id 1 dark red, 2 green,
    ...): the bits of the id spread over the high bits of R, G and B."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def write_palette_png(path: str | Path, mask: np.ndarray) -> None:
    """An instance mask ``(H, W)`` uint8 as a palette PNG (the values are the ids)."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    image.putpalette(davis_palette().ravel().tolist())
    image.save(path, format="PNG")


def read_palette_png(path: str | Path) -> np.ndarray:
    """The ids ``(H, W)`` uint8 of a palette (or grayscale) PNG mask."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: a DAVIS mask is a palette or grayscale PNG, "
                             f"got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8)


class DavisVideos:
    """The videos of one split of a local DAVIS 2017 folder, read one at a time.

    Args:
        root: the folder holding ``ImageSets``, ``JPEGImages`` and ``Annotations``.
        split: the list ``ImageSets/2017/<split>.txt`` (``val``: the paper's 30 videos).

    Raises:
        FileNotFoundError: the split list, or a listed video's frame folder, is missing.
        ValueError: the list is empty.
    """

    def __init__(self, root: str | Path, split: str = "val") -> None:
        self.root = Path(root)
        listing = self.root / "ImageSets" / "2017" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"no DAVIS split list {listing} (expected the DAVIS 2017 "
                                    f"layout: ImageSets/2017/{split}.txt)")
        self.names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not self.names:
            raise ValueError(f"{listing} lists no videos")
        for name in self.names:
            folder = self._frames_dir(name)
            if not folder.is_dir():
                raise FileNotFoundError(f"video {name!r} of {listing} has no frame folder "
                                        f"{folder}")

    def _frames_dir(self, name: str) -> Path:
        return self.root / "JPEGImages" / RESOLUTION / name

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Video:
        """Video ``index``: every frame and the annotation of every frame.

        Raises:
            ValueError: no frames, or a frame without its annotation, or sizes that differ.
        """
        name = self.names[index]
        frame_paths = sorted(self._frames_dir(name).glob("*.jpg"))
        if not frame_paths:
            raise ValueError(f"video {name!r}: no .jpg frames in {self._frames_dir(name)}")
        notes = self.root / "Annotations" / RESOLUTION / name
        frames, masks = [], []
        for path in frame_paths:
            note = notes / f"{path.stem}.png"
            if not note.is_file():
                raise ValueError(f"video {name!r}: frame {path.name} has no annotation {note}")
            with Image.open(path) as image:
                frames.append(np.asarray(image.convert("RGB")))
            masks.append(read_palette_png(note))
            if masks[-1].shape != frames[-1].shape[:2]:
                raise ValueError(f"video {name!r}: {note.name} is {masks[-1].shape}, its frame "
                                 f"{frames[-1].shape[:2]}")
        if len({f.shape for f in frames}) != 1:
            raise ValueError(f"video {name!r}: frames of different sizes")
        return Video(name, np.stack(frames), np.stack(masks))


def write_davis(root: str | Path, videos: Iterable[Video], split: str = "val",
                quality: int = 95) -> Path:
    """Writes ``videos`` in the DAVIS 2017 layout under ``root`` (JPEG frames, palette PNG
    annotations, the split list) and returns ``root``; :class:`DavisVideos` reads it back."""
    root = Path(root)
    names = []
    for video in videos:
        frames_dir = root / "JPEGImages" / RESOLUTION / video.name
        notes_dir = root / "Annotations" / RESOLUTION / video.name
        frames_dir.mkdir(parents=True, exist_ok=True)
        notes_dir.mkdir(parents=True, exist_ok=True)
        for t, (frame, mask) in enumerate(zip(video.frames, video.masks)):
            Image.fromarray(frame).save(frames_dir / f"{t:05d}.jpg", quality=quality)
            write_palette_png(notes_dir / f"{t:05d}.png", mask)
        names.append(video.name)
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{n}\n" for n in names))
    return root


def write_masks(folder: str | Path, masks: np.ndarray) -> list[Path]:
    """Predicted masks ``(T, H, W)`` as ``folder/00000.png ...`` palette PNGs (the layout the
    DAVIS toolkit's ``--results_path`` reads, one folder per video)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, mask in enumerate(masks):
        paths.append(folder / f"{t:05d}.png")
        write_palette_png(paths[-1], mask)
    return paths
