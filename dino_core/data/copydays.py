"""Copy detection sets: the Copydays layout, and a procedural stand-in with strong edits.

Copydays (Jegou et al. 2008; the DINO reference's ``eval_copy_detection.py``) keeps the
originals in ``<root>/original/`` and the edited copies in ``<root>/strong/`` (and, when
present, ``jpegqual/<q>/`` and ``crops/<c>/``), all ``.jpg``. Names are image ids such as
``200000.jpg``: the first four characters are the block (``2000``), and a ``strong`` copy's
positives are the originals of its block (``200001.jpg`` -> ``200000.jpg``). The other blocks
hold one copy per original under the original's name, matched 1:1 in sorted order, as in the
reference. Distractors (the reference: 10k YFCC100M images) are any folder of images.

The procedural set draws originals with :mod:`dino_core.data.instances` and makes each copy
with 2-4 strong edits: a crop, a rotation, low-quality JPEG, blur, colour changes, a pasted
text or shape overlay (Copydays' "strong" edits are of that kind: print-scan, paint, crops).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from dino_core.data.folder import is_image_name
from dino_core.data.instances import VIEWS, random_instance, render

BLOCK_PREFIX = 4  # characters of a Copydays name that give its block (the reference's [:4])


@dataclass
class CopyQueries:
    """One block of queries: image paths and, per query, the indices of its originals."""

    name: str
    paths: list[Path]
    positives: list[list[int]]


def _jpgs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg" and
                  not p.name.startswith("."))


def read_copydays(root: str | Path) -> tuple[list[Path], list[CopyQueries]]:
    """The originals and the query blocks of a Copydays folder.

    Returns:
        ``(originals, blocks)``; ``strong`` first among the blocks.

    Raises:
        FileNotFoundError: no ``original/`` or no ``strong/`` folder.
        ValueError: a strong copy without an original of its block, or a 1:1 block whose
            size differs from the originals'.
    """
    root = Path(root)
    for sub in ("original", "strong"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"no folder {root / sub} (Copydays layout: original/, "
                                    "strong/, optionally jpegqual/<q>/ and crops/<c>/)")
    originals = _jpgs(root / "original")
    if not originals:
        raise ValueError(f"no .jpg originals in {root / 'original'}")
    blocks: dict[str, list[int]] = {}
    for i, p in enumerate(originals):
        blocks.setdefault(p.name[:BLOCK_PREFIX], []).append(i)
    strong = _jpgs(root / "strong")
    orphans = [p.name for p in strong if p.name[:BLOCK_PREFIX] not in blocks]
    if orphans:
        raise ValueError(f"strong copies without an original of their block "
                         f"(first {BLOCK_PREFIX} characters of the name): {orphans[:5]}")
    out = [CopyQueries("strong", strong, [blocks[p.name[:BLOCK_PREFIX]] for p in strong])]
    for family in ("jpegqual", "crops"):
        if not (root / family).is_dir():
            continue
        subs = [d for d in (root / family).iterdir() if d.is_dir()]
        for d in sorted(subs, key=lambda d: (not d.name.isdigit(), int(d.name) if
                                             d.name.isdigit() else 0, d.name)):
            paths = _jpgs(d)
            if len(paths) != len(originals):
                raise ValueError(f"{d}: {len(paths)} images for {len(originals)} originals")
            out.append(CopyQueries(f"{family}/{d.name}", paths, [[i] for i in range(len(paths))]))
    return originals, out


def image_files(folder: str | Path) -> list[Path]:
    """The images directly in ``folder``, sorted (distractor and whitening folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p.name))
    if not files:
        raise ValueError(f"no images in {folder}")
    return files


# ---- strong edits, PIL only -------------------------------------------------------------

def _crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    f = math.sqrt(rng.uniform(0.4, 0.7))  # keep 40-70% of the area
    cw, ch = max(8, int(w * f)), max(8, int(h * f))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x, y, x + cw, y + ch))


def _rotate(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = rng.choice([-1, 1]) * rng.uniform(10, 30)
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    return im.rotate(float(angle), Image.Resampling.BILINEAR, expand=True, fillcolor=fill)


def _jpeg(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(rng.integers(5, 16)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _blur(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 2.5)) * min(im.size) / 96))


def _colour(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    im = ImageEnhance.Color(im).enhance(float(rng.uniform(0.0, 2.0)))
    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.6, 1.4)))
    im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.5, 1.5)))
    shift = rng.integers(-40, 41, 3)  # a colour cast per channel
    lut = [int(np.clip(v + shift[c], 0, 255)) for c in range(3) for v in range(256)]
    return im.point(lut)


def _overlay(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    im = im.copy()
    draw = ImageDraw.Draw(im)
    w, h = im.size
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
        text = "".join(chr(int(c)) for c in rng.integers(65, 91, int(rng.integers(4, 9))))
        draw.text((rng.uniform(0, w / 2), rng.uniform(0, h * 0.8)), text, fill=colour,
                  font_size=max(8, h // 6))
    else:
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.25) * min(w, h)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([x - r, y - r, x + r, y + r], fill=colour)
    return im


EDITS = {"crop": _crop, "rotate": _rotate, "jpeg": _jpeg, "blur": _blur, "colour": _colour,
         "overlay": _overlay}


def strong_edit(im: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
    """2-4 distinct edits of :data:`EDITS` in random order; JPEG, if drawn, comes last (as a
    re-upload would). Returns the copy and the names of the edits applied."""
    names = [str(n) for n in rng.choice(sorted(EDITS), size=int(rng.integers(2, 5)),
                                        replace=False)]
    names.sort(key=lambda n: n == "jpeg")
    for n in names:
        im = EDITS[n](im, rng)
    return im, names


class ProceduralCopydays:
    """Originals, strong copies and distractors drawn in code.

    Args:
        num_originals: Originals, each an object instance on its background.
        copies: Strong copies per original (the queries).
        distractors: Images of other instances added to the database.
        image_size: Shorter side of the originals (each side in [1, 1.5] x this).
        seed: Any int; the set is a pure function of it.
    """

    def __init__(self, num_originals: int = 20, copies: int = 2, distractors: int = 40,
                 image_size: int = 96, seed: int = 0) -> None:
        if num_originals < 1 or copies < 1 or distractors < 0:
            raise ValueError(f"need >= 1 original, >= 1 copy each and >= 0 distractors, got "
                             f"{num_originals}, {copies}, {distractors}")
        self.num_originals, self.copies = num_originals, copies
        self.distractors, self.image_size = distractors, image_size
        self._entropy = seed % 2**64

    def _image(self, kind: int, i: int) -> Image.Image:
        rng = np.random.default_rng((self._entropy, kind, i))
        s = self.image_size
        size = (int(rng.integers(s, int(1.5 * s) + 1)), int(rng.integers(s, int(1.5 * s) + 1)))
        return render(random_instance(rng), VIEWS["easy"], rng, size)[0]

    def original(self, i: int) -> Image.Image:
        return self._image(0, i)

    def distractor(self, i: int) -> Image.Image:
        return self._image(1, i)

    def query(self, q: int) -> tuple[Image.Image, int, list[str]]:
        """Copy ``q``: ``(image, index of its original, edits applied)``."""
        i = q // self.copies
        rng = np.random.default_rng((self._entropy, 2, q))
        image, names = strong_edit(self.original(i), rng)
        return image, i, names

    @property
    def n_queries(self) -> int:
        return self.num_originals * self.copies

    def write(self, root: str | Path) -> Path:
        """Writes the set in the Copydays layout: ``original/<2000+i>00.jpg``, its copies
        ``strong/<2000+i><k+1:02d>.jpg`` and ``distractors/<d:06d>.jpg`` under ``root``."""
        root = Path(root)
        for sub in ("original", "strong", "distractors"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if self.num_originals > 7999 or self.copies > 99:
            raise ValueError("the Copydays names hold at most 7999 originals and 99 copies")
        for i in range(self.num_originals):
            self.original(i).save(root / "original" / f"{2000 + i}00.jpg", quality=95)
        for q in range(self.n_queries):
            image, i, _ = self.query(q)
            image.save(root / "strong" / f"{2000 + i}{q % self.copies + 1:02d}.jpg", quality=95)
        for d in range(self.distractors):
            self.distractor(d).save(root / "distractors" / f"{d:06d}.jpg", quality=95)
        return root
