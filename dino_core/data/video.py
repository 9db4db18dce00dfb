"""A video set drawn in code, for the label-propagation evaluation offline (the DAVIS 2017
protocol of ``dino_core.eval.video`` without the DAVIS download).

Each video shows 2-3 shapes of :mod:`dino_core.data.procedural` (circle, star, cross, ...),
each with its own colour and stripes that move with it, on a static textured background (a
smooth colour field and a grating). Over the video every object slides from its own side
of the frame towards the opposite side, turns and grows or shrinks; their paths cross near
the centre, so objects occlude one another there. The instance masks give every pixel the
id of the front-most object covering it (0 background, 1..n objects, later ids in front),
so occluded parts belong to the occluder, as in DAVIS. In the first frame the objects are
apart, so every id appears there.

Every video is a pure function of ``(seed, index)``, like the procedural image set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dino_core.data.procedural import _SHAPES

# The solid shapes: a ring's or crescent's band is about one 8 px patch wide at 96 px, finer
# than the patch grid the labels travel on.
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")


@dataclass
class Video:
    """One video and its instance masks.

    Attributes:
        name: the video's name (its folder in the DAVIS layout).
        frames: RGB frames ``(T, H, W, 3)`` uint8.
        masks: instance ids ``(T, H, W)`` uint8, 0 background.
    """

    name: str
    frames: np.ndarray
    masks: np.ndarray


@dataclass
class _Track:
    shape: str
    colour: np.ndarray  # (3,) float
    stripes: tuple[float, float]  # spatial frequency (cycles per radius) and phase
    start: np.ndarray  # centre at the first frame (x, y) in pixels
    end: np.ndarray  # centre at the last frame
    radius: float
    growth: float  # radius factor reached at the last frame
    angle: float  # rotation at the first frame
    turn: float  # rotation added over the video


class ProceduralVideos:
    """Moving, turning, scaling and occluding shapes over texture, with instance masks.

    Args:
        length: Number of videos.
        num_frames: Frames per video (at least 3: DAVIS scores neither the first nor the last).
        image_size: Side of the square frames in pixels.
        max_objects: Each video has 2 to ``max_objects`` (at most 3) objects.
        seed: Any int; different seeds give independent sets.

    Example:
        >>> video = ProceduralVideos(1, num_frames=4, image_size=32)[0]
        >>> video.frames.shape, video.masks.shape, int(video.masks[0].max()) >= 2
        ((4, 32, 32, 3), (4, 32, 32), True)
    """

    def __init__(self, length: int = 4, num_frames: int = 12, image_size: int = 96,
                 max_objects: int = 3, seed: int = 0) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if num_frames < 3:
            raise ValueError(f"num_frames must be >= 3, got {num_frames}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if not 2 <= max_objects <= 3:
            raise ValueError(f"max_objects must be 2 or 3, got {max_objects}")
        self.length, self.num_frames, self.image_size = length, num_frames, image_size
        self.max_objects, self.seed = max_objects, seed
        self._entropy = seed % 2**64
        self.supersample = 4 if image_size <= 128 else 2

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Video:
        return self.sample(index)[0]

    def sample(self, index: int) -> tuple[Video, np.ndarray]:
        """Video ``index`` and its objects' own (unoccluded) masks ``(T, n, H, W)`` bool, back
        to front."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        rng = np.random.default_rng((self._entropy, index))
        size = self.image_size
        background = self._background(rng)
        tracks = self._tracks(rng, background)
        frames, masks, layers = [], [], []
        for t in range(self.num_frames):
            progress = t / (self.num_frames - 1)
            image = background.copy()
            label = np.zeros((size, size), np.uint8)
            own = []
            for obj, track in enumerate(tracks, start=1):
                alpha, texture = self._render(track, progress)
                image = image * (1 - alpha[..., None]) + texture * alpha[..., None]
                label[alpha >= 0.5] = obj  # drawn back to front: the front object wins
                own.append(alpha >= 0.5)
            image += rng.normal(0.0, 4.0, image.shape)  # fresh sensor noise every frame
            frames.append(np.clip(image + 0.5, 0, 255).astype(np.uint8))
            masks.append(label)
            layers.append(np.stack(own))
        video = Video(f"procedural-{index:03d}", np.stack(frames), np.stack(masks))
        return video, np.stack(layers)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A smooth colour field with a faint grating, ``(H, W, 3)`` float32."""
        size = self.image_size
        grid = rng.integers(0, 256, (3, 3, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC),
                           dtype=np.float32)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        theta, period = rng.uniform(0, math.pi), rng.uniform(0.1, 0.25) * size
        grating = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
        return field * (1 + 0.15 * grating[..., None]).astype(np.float32)

    def _tracks(self, rng: np.random.Generator, background: np.ndarray) -> list[_Track]:
        size = self.image_size
        n = int(rng.integers(2, self.max_objects + 1))
        shapes = rng.choice(len(SHAPES), size=n, replace=False)
        phase = rng.uniform(0, 2 * math.pi)
        centre, reach = np.array([size / 2, size / 2]), 0.26 * size
        mean_bg = background.reshape(-1, 3).mean(axis=0)
        tracks: list[_Track] = []
        for k in range(n):
            # start on a circle around the centre, 360/n degrees apart (so apart in frame 0),
            # end on the far side, off the diametre: the paths cross near the centre, but
            # not all in one point (which would hide all but the front object)
            a = phase + 2 * math.pi * k / n
            direction = np.array([math.cos(a), math.sin(a)])
            b = a + math.pi + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
            end = centre + reach * rng.uniform(0.7, 1.0) * np.array([math.cos(b), math.sin(b)])
            tracks.append(_Track(
                shape=SHAPES[int(shapes[k])],
                colour=self._colour(rng, [mean_bg] + [t.colour for t in tracks]),
                stripes=(rng.uniform(1.0, 2.5), rng.uniform(0, 2 * math.pi)),
                start=centre + reach * direction, end=end,
                radius=size * rng.uniform(0.16, 0.22), growth=rng.uniform(0.75, 1.3),
                angle=rng.uniform(0, 2 * math.pi), turn=rng.uniform(-math.pi, math.pi)))
        return tracks

    @staticmethod
    def _colour(rng: np.random.Generator, others: list[np.ndarray]) -> np.ndarray:
        """A random colour, redrawn a few times while it is close to one of ``others``."""
        colour = rng.uniform(0, 255, 3)
        for _ in range(16):
            if min(np.linalg.norm(colour - o) for o in others) > 90:
                break
            colour = rng.uniform(0, 255, 3)
        return colour.astype(np.float32)

    def _render(self, track: _Track, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """The object's anti-aliased coverage ``(H, W)`` and its striped texture ``(H, W, 3)``
        at ``progress`` in [0, 1] through the video."""
        size, ss = self.image_size, self.supersample
        cx, cy = track.start + progress * (track.end - track.start)
        radius = track.radius * (1 + progress * (track.growth - 1))
        theta = track.angle + progress * track.turn
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        layer = Image.new("L", (size * ss, size * ss), 0)
        draw = ImageDraw.Draw(layer)
        filled, holes = _SHAPES[track.shape]
        for polygons, value in ((filled, 255), (holes, 0)):
            for poly in polygons:
                pts = (poly @ rot.T * radius + (cx, cy)) * ss
                draw.polygon([tuple(p) for p in pts.tolist()], fill=value)
        alpha = np.asarray(layer.reduce(ss), dtype=np.float32) / 255.0
        # stripes in the object's own frame: they move and turn with it
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        u = ((xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)) / radius
        freq, phase = track.stripes
        shade = 1 + 0.3 * np.sin(2 * math.pi * freq * u + phase)
        return alpha, (track.colour * shade[..., None]).astype(np.float32)
