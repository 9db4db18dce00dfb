"""A labelled image set drawn in code, for k-NN accuracy and attention-mask checks offline.

Each image shows one main object whose *shape* is the class (circle, square, ...) on a
cluttered background: a smooth random colour field, pixel noise, and a few thin lines and
elongated blobs that are not class shapes. Colour, size, position and rotation are drawn
independently of the class, so only shape separates the classes. The main object's pixel mask
comes with each image, to score how well a ViT's attention maps pick out the object (the DINO
paper's Fig. 3 / Table 7 measure this as Jaccard similarity on PASCAL VOC).

Every sample is a pure function of ``(seed, index)`` (its own ``np.random.default_rng``), so
indexing is random-access, thread- and process-safe, and identical on every worker.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")


def _regular(n: int, radius: float = 1.0, phase: float = math.pi / 2) -> np.ndarray:
    """Vertices ``(n, 2)`` of a regular polygon inscribed in a circle of ``radius``."""
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _regular(2 * points) * radii[:, None]


def _cross(half_width: float = 0.32) -> np.ndarray:
    w = half_width
    quarter = [(w, 1), (w, w), (1, w)]
    pts = []
    for k in range(4):  # the same three corners, turned clockwise by 90 degrees each time
        c, s = round(math.cos(-k * math.pi / 2)), round(math.sin(-k * math.pi / 2))
        pts += [(c * x - s * y, s * x + c * y) for x, y in quarter]
    return np.asarray(pts) / math.hypot(1, w)  # circumscribed radius 1, like the others


# Unit shapes inside the unit circle: (polygons filled with the object, polygons cut out).
_CIRCLE = _regular(64)
_SHAPES: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {
    "circle": ([_CIRCLE], []),
    "square": ([_regular(4, phase=math.pi / 4)], []),
    "triangle": ([_regular(3)], []),
    "star": ([_star()], []),
    "cross": ([_cross()], []),
    "ring": ([_CIRCLE], [0.55 * _CIRCLE]),
    "hexagon": ([_regular(6)], []),
    "crescent": ([_CIRCLE], [0.8 * _CIRCLE + np.array([0.45, 0.0])]),
}


def class_dir_name(label: int) -> str:
    """Folder name of a class, index-prefixed so that sorted order equals label order."""
    return f"{label:02d}_{CLASSES[label]}"


def masks_root(root: str | Path) -> Path:
    """Where :func:`write_image_folder` puts the masks of ``root``: the sibling ``<root>_masks``.

    A sibling rather than a subfolder, so that scanning ``root`` never picks masks up as images.
    """
    root = Path(root)
    return root.parent / f"{root.name}_masks"


class ProceduralShapes(torch.utils.data.Dataset):
    """Shapes on clutter, labelled by shape.

    Args:
        length: Number of samples.
        image_size: Side of the square RGB images in pixels.
        num_classes: Uses the first ``num_classes`` entries of :data:`CLASSES`.
        seed: Any int; different seeds give independent sets (e.g. train vs test).
        transform: Applied to the PIL image in ``__getitem__``.
        difficulty: In [0, 1], how much varies besides the shape: the background's colour
            variation, the number of distractors, the pixel noise, the rotation range and the
            spread of object sizes and positions. 1 is the hard set (cluttered, any rotation,
            30-60% of the side anywhere); 0 is an upright, centred object of about half the
            side on a flat background.
        colourful: Random colours for background, object and distractors. False draws a
            light object on a dark grey scene: colour is the strongest cue two crops of an
            image share, so a few CPU minutes of DINO learn colour, which is unrelated to the
            class, unless it is taken away.

    Example:
        >>> ds = ProceduralShapes(10, image_size=32)
        >>> image, label, mask = ds.sample(3)
        >>> image.size, mask.shape, 0 <= label < 6
        ((32, 32), (32, 32), True)
    """

    def __init__(
        self,
        length,
        image_size=64,
        num_classes=6,
        seed=0,
        transform=None,
        difficulty=1.0,
        colourful=True,
    ) -> None:
        self.colourful = bool(colourful)
        if not 0.0 <= difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
        self.difficulty = float(difficulty)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if not 2 <= num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in [2, {len(CLASSES)}], got {num_classes}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.length, self.image_size, self.num_classes = length, image_size, num_classes
        self.seed, self.transform = seed, transform
        # numpy seeds must be non-negative; wrapping keeps any int64 seed distinct.
        self._entropy = seed % 2**64
        self.classes = list(CLASSES[:num_classes])
        # Anti-aliasing by supersampling; 4x is plenty below 128 px and 2x keeps big images fast.
        self.supersample = 4 if image_size <= 128 else 2

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        image, label, _ = self.sample(index)
        return (self.transform(image) if self.transform else image), label

    def sample(self, index: int) -> tuple[Image.Image, int, np.ndarray]:
        """Draws sample ``index``.

        Returns:
            ``(image, label, mask)``: an RGB PIL image ``(image_size, image_size)``, the class
            index, and a bool array ``(H, W)`` that is True on the main object's pixels.
        """
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        rng = np.random.default_rng((self._entropy, index))
        label = int(rng.integers(self.num_classes))
        size = self.image_size

        # Smooth colour field: a 3x3 random grid upsampled, i.e. low-frequency noise.
        grid = rng.integers(0, 256, (3, 3, 3)).astype(np.float32)
        # easier: the colour field shrinks towards its mean colour
        grid = grid.mean(axis=(0, 1)) + self.difficulty * (grid - grid.mean(axis=(0, 1)))
        grid = grid.round().astype(np.uint8)
        canvas = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
        self._draw_distractors(rng, canvas)
        background = np.asarray(canvas, dtype=np.float32)

        alpha, (cx, cy, radius) = self._object_alpha(rng, CLASSES[label])
        colour = self._contrasting_colour(rng, background, cx, cy, radius)
        if not self.colourful:
            # a light object on a dark scene: the random colours are what a short DINO run
            # latches onto (they are shared by the views of an image), so without them
            # shape is what the views have in common
            background = background.mean(axis=-1, keepdims=True) * 0.35 * np.ones(3, np.float32)
            colour = np.full(3, 230.0, np.float32)
        image = background * (1 - alpha[..., None]) + colour * alpha[..., None]
        # Pixel noise so that neither the object nor the background is a flat colour.
        image += rng.normal(0.0, 6.0 * max(self.difficulty, 0.25), image.shape).astype(np.float32)
        image = Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8))
        return image, label, alpha >= 0.5

    def _object_alpha(self, rng: np.random.Generator, shape: str):
        """Anti-aliased coverage ``(H, W)`` in [0, 1] of the main object, and its circle."""
        size, ss = self.image_size, self.supersample
        d = self.difficulty
        # diameter 30-60% of the side at difficulty 1, 45-55% at 0
        radius = 0.5 * size * rng.uniform(0.45 - 0.15 * d, 0.55 + 0.05 * d)
        # Centre at >= 0.85 radius from the border: the object is (almost) fully inside;
        # easier sets keep it nearer the middle.
        spread = (size / 2 - 0.85 * radius) * max(d, 0.2)
        cx, cy = rng.uniform(size / 2 - spread, size / 2 + spread, size=2)
        theta = rng.uniform(0, 2 * math.pi * d)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])

        layer = Image.new("L", (size * ss, size * ss), 0)
        draw = ImageDraw.Draw(layer)
        filled, holes = _SHAPES[shape]
        for polygons, value in ((filled, 255), (holes, 0)):
            for poly in polygons:
                pts = (poly @ rot.T * radius + (cx, cy)) * ss
                draw.polygon([tuple(p) for p in pts.tolist()], fill=value)
        # reduce() box-averages ss x ss blocks: coverage, i.e. the anti-aliased alpha.
        alpha = np.asarray(layer.reduce(ss), dtype=np.float32) / 255.0
        return alpha, (cx, cy, radius)

    def _draw_distractors(self, rng: np.random.Generator, canvas: Image.Image) -> None:
        """Draws 2-5 small lines and elongated blobs: clutter that is never a class shape."""
        size = self.image_size
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(round(rng.integers(2, 6) * self.difficulty))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            x, y = rng.uniform(0, size, 2)
            if rng.random() < 0.5:
                length, angle = rng.uniform(0.15, 0.5) * size, rng.uniform(0, math.pi)
                end = (x + length * math.cos(angle), y + length * math.sin(angle))
                draw.line(
                    [(x, y), end], fill=colour, width=int(rng.integers(1, max(2, size // 24)))
                )
            else:
                # Aspect >= 2.5 and at most 12% of the side: unlike any (round, large) class shape.
                long_axis = rng.uniform(0.06, 0.12) * size
                short = long_axis / rng.uniform(2.5, 4.0)
                half_w, half_h = (long_axis, short) if rng.random() < 0.5 else (short, long_axis)
                draw.ellipse([x - half_w, y - half_h, x + half_w, y + half_h], fill=colour)

    @staticmethod
    def _contrasting_colour(rng, background, cx, cy, radius) -> np.ndarray:
        """A uniform random RGB colour, redrawn a few times if it matches the local background.

        The rule depends on the background only, never on the class, so colour stays
        uninformative about the label while the object stays visible.
        """
        size = background.shape[0]
        y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius, size)) + 1
        x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius, size)) + 1
        local_mean = background[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
        colour = rng.uniform(0, 255, 3)
        for _ in range(8):
            if np.linalg.norm(colour - local_mean) > 90:
                break
            colour = rng.uniform(0, 255, 3)
        return colour.astype(np.float32)


def write_image_folder(
    root: str | Path,
    length: int,
    image_size: int = 64,
    num_classes: int = 6,
    seed: int = 0,
    masks: bool = True,
    difficulty: float = 1.0,
    colourful: bool = True,
) -> int:
    """Writes a :class:`ProceduralShapes` set as PNG files, for the folder-based CLI paths.

    Layout: ``root/<NN_class>/<index:06d>.png`` and, with ``masks``, the 0/255 grayscale mask
    at the same relative path under :func:`masks_root` (``<root>_masks/``). Class folders are
    named by :func:`class_dir_name` so ``ImageFolder``'s sorted labels equal the generator's;
    every class folder is created, even one that receives no image.

    Returns:
        The number of files written (images plus masks).
    """
    root = Path(root)
    dataset = ProceduralShapes(length, image_size, num_classes, seed, difficulty=difficulty, colourful=colourful)
    targets = [root] + ([masks_root(root)] if masks else [])
    for base in targets:
        for label in range(num_classes):
            (base / class_dir_name(label)).mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(length):
        image, label, mask = dataset.sample(index)
        relative = Path(class_dir_name(label)) / f"{index:06d}.png"
        # Level 1: these files are regenerated at will, so speed beats size.
        image.save(root / relative, compress_level=1)
        written += 1
        if masks:
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                masks_root(root) / relative, compress_level=1
            )
            written += 1
    return written
