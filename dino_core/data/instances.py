"""Object instances drawn in code, for instance retrieval offline (a stand-in for revisited
Oxford/Paris, whose queries are specific buildings).

An instance is one specific object: a shape of :mod:`dino_core.data.procedural`, an aspect
ratio, a body colour and a surface pattern (stripes, checks, dots, rings; their colour,
frequency and angle), fixed by ``(seed, instance)``. Each rendering draws it under a new view:
rotation, position, scale, a new cluttered background and new lighting (gain and colour cast).
Rendering 0 of every instance is its query; the others go to the gallery as *easy* positives
(mild change of view) or *hard* ones (any rotation, half the size, strong lighting change,
partly occluded), so the revisited Easy/Medium/Hard protocol applies. Distractors are
instances of their own, rendered once. Every image is a pure function of ``(seed, indices)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dino_core.data.procedural import _SHAPES

PATTERNS = ("solid", "stripes", "checker", "dots", "rings")


@dataclass(frozen=True)
class View:
    """How far a rendering departs from the canonical view: rotation ``+-rotate`` degrees,
    object radius ``scale`` x half the shorter side, centre shifted up to ``shift`` of the
    free room, lighting gain ``1 +- light`` and colour cast ``+-cast``, ``occluders`` blobs."""

    rotate: float
    scale: tuple[float, float]
    shift: float
    light: float
    cast: float
    occluders: int = 0


VIEWS = {
    "query": View(rotate=10, scale=(0.6, 0.7), shift=0.1, light=0.05, cast=5),
    "easy": View(rotate=25, scale=(0.5, 0.8), shift=0.3, light=0.15, cast=12),
    "hard": View(rotate=180, scale=(0.3, 0.45), shift=0.8, light=0.45, cast=35, occluders=2),
}


@dataclass(frozen=True)
class Instance:
    """The fixed look of one object."""

    shape: str
    aspect: float
    colour: tuple[float, float, float]
    pattern: str
    pattern_colour: tuple[float, float, float]
    frequency: float
    angle: float


def random_instance(rng: np.random.Generator) -> Instance:
    shape = str(rng.choice(sorted(_SHAPES)))
    colour = rng.uniform(0, 255, 3)
    other = rng.uniform(0, 255, 3)
    for _ in range(8):  # a pattern that can be seen on its body
        if np.linalg.norm(other - colour) > 100:
            break
        other = rng.uniform(0, 255, 3)
    return Instance(shape, float(rng.uniform(0.7, 1.0)), tuple(colour.tolist()),
                    str(rng.choice(PATTERNS)), tuple(other.tolist()),
                    float(rng.uniform(1.5, 3.0)), float(rng.uniform(0, math.pi)))


def _pattern(inst: Instance, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pattern coverage in {0, 1} at object-frame coordinates ``u, v`` (units of the radius)."""
    f = inst.frequency
    if inst.pattern == "stripes":
        return np.sin(2 * math.pi * f * (u * math.cos(inst.angle) + v * math.sin(inst.angle))) > 0
    if inst.pattern == "checker":
        return np.sin(math.pi * f * u) * np.sin(math.pi * f * v) > 0
    if inst.pattern == "dots":
        a, b = (f * u / 2) % 1 - 0.5, (f * v / 2) % 1 - 0.5
        return a * a + b * b < 0.09
    if inst.pattern == "rings":
        return np.sin(2 * math.pi * f * np.hypot(u, v)) > 0
    return np.zeros_like(u, dtype=bool)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth random colour field with a few lines and blobs of clutter."""
    grid = rng.integers(0, 256, (3, 3, 3)).astype(np.uint8)
    canvas = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.04, 0.1) * min(w, h)
        if rng.random() < 0.5:
            a = rng.uniform(0, math.pi)
            draw.line([(x, y), (x + 3 * r * math.cos(a), y + 3 * r * math.sin(a))], fill=colour,
                      width=max(1, min(w, h) // 32))
        else:
            draw.ellipse([x - r, y - r / 3, x + r, y + r / 3], fill=colour)
    return canvas


def render(inst: Instance, view: View, rng: np.random.Generator, size: tuple[int, int],
           supersample: int = 4) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """One rendering of ``inst`` at ``size = (W, H)``.

    Returns:
        ``(image, bbx)``: the RGB image and the object's box ``(x0, y0, x1, y1)`` in pixels.
    """
    w, h = size
    radius = rng.uniform(*view.scale) * min(w, h) / 2
    room_x, room_y = max(w / 2 - radius, 0), max(h / 2 - radius, 0)
    cx = w / 2 + rng.uniform(-1, 1) * view.shift * room_x
    cy = h / 2 + rng.uniform(-1, 1) * view.shift * room_y
    theta = math.radians(rng.uniform(-view.rotate, view.rotate))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    stretch = np.array([1.0, inst.aspect])

    layer = Image.new("L", (w * supersample, h * supersample), 0)
    draw = ImageDraw.Draw(layer)
    filled, holes = _SHAPES[inst.shape]
    for polygons, value in ((filled, 255), (holes, 0)):
        for poly in polygons:
            pts = ((poly * stretch) @ rot.T * radius + (cx, cy)) * supersample
            draw.polygon([tuple(p) for p in pts.tolist()], fill=value)
    alpha = np.asarray(layer.reduce(supersample), dtype=np.float32) / 255.0

    # pixel centres in the object's frame: the pattern turns and scales with the object
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    d = np.stack([xs - cx, ys - cy], axis=-1) @ rot  # inverse rotation (rot is orthogonal)
    pat = _pattern(inst, d[..., 0] / radius, d[..., 1] / (radius * inst.aspect))
    body = np.where(pat[..., None], np.asarray(inst.pattern_colour, np.float32),
                    np.asarray(inst.colour, np.float32))

    canvas = np.asarray(_background(rng, w, h), dtype=np.float32)
    image = canvas * (1 - alpha[..., None]) + body * alpha[..., None]
    if view.occluders:
        occ = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        od = ImageDraw.Draw(occ)
        for _ in range(view.occluders):  # blobs over the object: part of it is hidden
            ox, oy = cx + rng.uniform(-0.6, 0.6) * radius, cy + rng.uniform(-0.6, 0.6) * radius
            orad = rng.uniform(0.15, 0.3) * radius
            od.ellipse([ox - orad, oy - orad, ox + orad, oy + orad],
                       fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image = np.asarray(occ, dtype=np.float32)
    gain = 1 + rng.uniform(-view.light, view.light)
    cast = rng.uniform(-view.cast, view.cast, 3).astype(np.float32)
    image = image * gain + cast + rng.normal(0, 4, image.shape).astype(np.float32)
    rows, cols = np.nonzero(alpha >= 0.5)
    bbx = ((float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
           if rows.size else (0.0, 0.0, float(w), float(h)))
    return Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8)), bbx


class InstanceSet:
    """Queries, gallery and ground truth of the procedural instance-retrieval set.

    Args:
        num_instances: Objects with a query each.
        renderings: Renderings per object: one query and ``renderings - 1`` gallery images,
            the first half (rounded up) easy, the rest hard.
        distractors: Gallery images of other objects (no query's positive).
        image_size: Shorter side of the images; each side is drawn in [1, 1.5] x this.
        seed: Any int; the whole set is a pure function of it.

    Example:
        >>> s = InstanceSet(3, renderings=4, distractors=2, image_size=32)
        >>> s.n_gallery, s.gnd()[0]["easy"], s.gnd()[0]["hard"]
        (11, [0, 1], [2])
    """

    def __init__(self, num_instances: int = 20, renderings: int = 4, distractors: int = 20,
                 image_size: int = 64, seed: int = 0) -> None:
        if num_instances < 1 or renderings < 2 or distractors < 0:
            raise ValueError(f"need >= 1 instance, >= 2 renderings and >= 0 distractors, got "
                             f"{num_instances}, {renderings}, {distractors}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.num_instances, self.renderings = num_instances, renderings
        self.distractors, self.image_size = distractors, image_size
        self._entropy = seed % 2**64
        self.n_easy = math.ceil((renderings - 1) / 2)
        self.n_queries = num_instances
        self.n_gallery = num_instances * (renderings - 1) + distractors

    def _instance(self, kind: int, i: int) -> Instance:
        return random_instance(np.random.default_rng((self._entropy, kind, i)))

    def _draw(self, inst: Instance, view: str, key: tuple[int, ...]):
        rng = np.random.default_rng((self._entropy, *key))
        s = self.image_size
        size = (int(rng.integers(s, int(1.5 * s) + 1)), int(rng.integers(s, int(1.5 * s) + 1)))
        return render(inst, VIEWS[view], rng, size)

    def query(self, i: int) -> Image.Image:
        return self.query_with_box(i)[0]

    def query_with_box(self, i: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
        if not 0 <= i < self.n_queries:
            raise IndexError(f"query {i} out of range for {self.n_queries}")
        return self._draw(self._instance(0, i), "query", (1, i, 0))

    def owner(self, j: int) -> tuple[int, int]:
        """``(instance, rendering)`` of gallery image ``j``; ``(-1, d)`` for distractor d."""
        if not 0 <= j < self.n_gallery:
            raise IndexError(f"gallery image {j} out of range for {self.n_gallery}")
        per = self.renderings - 1
        if j < self.num_instances * per:
            return j // per, j % per + 1
        return -1, j - self.num_instances * per

    def gallery(self, j: int) -> Image.Image:
        inst, r = self.owner(j)
        if inst < 0:
            return self._draw(self._instance(2, r), "easy", (3, r))[0]
        view = "easy" if r <= self.n_easy else "hard"
        return self._draw(self._instance(0, inst), view, (1, inst, r))[0]

    def gnd(self) -> list[dict[str, Any]]:
        """Per query: ``easy``/``hard`` gallery indices, empty ``junk``, the box ``bbx``."""
        per, out = self.renderings - 1, []
        for i in range(self.n_queries):
            ids = list(range(i * per, (i + 1) * per))
            out.append({"easy": ids[: self.n_easy], "hard": ids[self.n_easy :], "junk": [],
                        "bbx": list(self.query_with_box(i)[1])})
        return out
