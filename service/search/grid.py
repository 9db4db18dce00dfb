"""``dino neighbours --grid``: one PNG row of square tiles, the query's image first and then
each neighbour's, with its rank and cosine under it.

A neighbour's image is read from the manifest's ``data`` root and its key; where that is not
a readable image (a packed set's keys name members of tar shards, a folder moved since, an
image removed) the tile says "not readable", and the row keeps its place.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

from dino_core.data.folder import load_rgb
from service.storage import read_bytes, write_bytes

TILE = 128  # px: a tile's width, and the side its image is fitted into
CAPTION = 30  # px under each image: two lines of the default font
BACKGROUND, PLACEHOLDER, TEXT = (24, 24, 24), (70, 70, 70), (235, 235, 235)


@dataclass(frozen=True)
class Tile:
    location: str  # the image file (local path or URL)
    caption: str  # first line: rank and cosine, or "query"
    key: str  # second line


def open_image(location: str) -> Image.Image | None:
    """The image at ``location``, upright RGB; None when it cannot be read or decoded."""
    try:
        return load_rgb(io.BytesIO(read_bytes(location)))
    except Exception:  # missing, no access, not an image: decoders raise many types
        return None


def render_tile(tile: Tile, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    canvas = Image.new("RGB", (TILE, TILE + CAPTION), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    image = open_image(tile.location)
    if image is None:
        draw.rectangle((2, 2, TILE - 3, TILE - 3), fill=PLACEHOLDER)
        left, top, right, bottom = draw.textbbox((0, 0), "not readable", font=font)
        draw.text(((TILE - right - left) // 2, (TILE - bottom - top) // 2), "not readable",
                  fill=TEXT, font=font)
    else:
        image = ImageOps.contain(image, (TILE - 4, TILE - 4))  # small images scaled up too
        canvas.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
    draw.text((4, TILE + 2), tile.caption, fill=TEXT, font=font)
    draw.text((4, TILE + 15), _fit(tile.key, draw, font), fill=TEXT, font=font)
    return canvas


def _fit(text: str, draw: ImageDraw.ImageDraw, font) -> str:
    """``text`` cut from the left (``...at/17.png``) to fit a tile: a key's end names it."""
    if draw.textlength(text, font=font) <= TILE - 8:
        return text
    while text and draw.textlength("..." + text, font=font) > TILE - 8:
        text = text[1:]
    return "..." + text


def render_grid(tiles: Sequence[Tile]) -> Image.Image:
    """``len(tiles)`` tiles side by side: ``(len(tiles) * TILE, TILE + CAPTION)`` px."""
    font = ImageFont.load_default()
    grid = Image.new("RGB", (len(tiles) * TILE, TILE + CAPTION), BACKGROUND)
    for n, tile in enumerate(tiles):
        grid.paste(render_tile(tile, font), (n * TILE, 0))
    return grid


def write_grid(location: str, tiles: Sequence[Tile]) -> None:
    """The grid as a PNG file at ``location`` (a local path or a URL)."""
    buf = io.BytesIO()
    render_grid(tiles).save(buf, format="PNG")
    write_bytes(location, buf.getvalue())
