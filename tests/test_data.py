"""Procedural shapes set, local image folder loading, and the multi-crop collate function."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_core.augment.per_image import eval_transform
from dino_core.data.collate import collate_multicrop
from dino_core.data.folder import ImageFolder, load_rgb
from dino_core.data.procedural import (
    CLASSES,
    ProceduralShapes,
    class_dir_name,
    masks_root,
    write_image_folder,
)

# ---------------------------------------------------------------------------- procedural set


def test_procedural_is_deterministic_per_seed_and_index():
    a, b = ProceduralShapes(50, seed=3), ProceduralShapes(50, seed=3)
    for i in (0, 7, 49):
        img1, label1, mask1 = a.sample(i)
        img2, label2, mask2 = b.sample(i)
        img3, _, _ = a.sample(i)  # same object, asked twice
        assert label1 == label2
        np.testing.assert_array_equal(np.asarray(img1), np.asarray(img2))
        np.testing.assert_array_equal(np.asarray(img1), np.asarray(img3))
        np.testing.assert_array_equal(mask1, mask2)
    other = np.asarray(ProceduralShapes(50, seed=4).sample(0)[0])
    assert not np.array_equal(other, np.asarray(a.sample(0)[0]))
    with pytest.raises(IndexError):
        a.sample(50)


def test_procedural_is_identical_in_dataloader_workers():
    ds = ProceduralShapes(8, image_size=32, transform=lambda im: torch.from_numpy(np.array(im)))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    images = torch.cat([x for x, _ in loader])
    expected = torch.stack([torch.from_numpy(np.array(ds.sample(i)[0])) for i in range(8)])
    assert torch.equal(images, expected)


@pytest.mark.parametrize("size", [8, 32, 64, 100])
def test_procedural_image_and_mask_size(size):
    image, label, mask = ProceduralShapes(3, image_size=size).sample(2)
    assert image.mode == "RGB" and image.size == (size, size)
    assert mask.dtype == np.bool_ and mask.shape == (size, size)


def test_procedural_labels_in_range_and_balanced():
    ds = ProceduralShapes(600, image_size=16, num_classes=6)
    labels = np.array([ds.sample(i)[1] for i in range(len(ds))])
    assert labels.min() >= 0 and labels.max() < 6
    counts = np.bincount(labels, minlength=6)
    assert counts.min() > 60 and counts.max() < 140, counts  # expected 100 each
    assert ds.classes == list(CLASSES[:6])
    with pytest.raises(ValueError, match="num_classes"):
        ProceduralShapes(10, num_classes=len(CLASSES) + 1)


def test_procedural_mask_covers_one_solid_object():
    ds = ProceduralShapes(60, image_size=64, num_classes=8)
    clean, object_colours = 0, {k: [] for k in range(8)}
    for i in range(len(ds)):
        image, label, mask = ds.sample(i)
        pixels = np.asarray(image, dtype=np.float32)
        area = mask.mean()
        assert 0.01 < area < 0.5, (i, area)
        # The object is one colour plus noise; the background is not that colour.
        colour = np.median(pixels[mask], axis=0)
        near = np.abs(pixels - colour).max(axis=-1) < 25
        if near[mask].mean() > 0.7 and near[~mask].mean() < 0.2:
            clean += 1
        object_colours[label].append(colour)
    assert clean >= 0.9 * len(ds)
    # Colours are drawn independently of the class: no class has a distinctive mean colour.
    for colours in object_colours.values():
        if len(colours) >= 4:
            assert np.all(np.abs(np.mean(colours, axis=0) - 127.5) < 80)


def test_procedural_transform_is_applied():
    ds = ProceduralShapes(4, image_size=32, transform=eval_transform(size=24))
    x, label = ds[1]
    assert x.shape == (3, 24, 24) and label == ds.sample(1)[1]


# ---------------------------------------------------------------------------- image folder


def test_write_image_folder_round_trip(tmp_path):
    root = tmp_path / "shapes"
    written = write_image_folder(root, length=24, image_size=32, num_classes=4, seed=5)
    assert written == 48
    assert masks_root(root) == tmp_path / "shapes_masks"
    folder = ImageFolder(root)  # the mask folder is a sibling: not scanned
    source = ProceduralShapes(24, image_size=32, num_classes=4, seed=5)
    assert len(folder) == 24
    assert folder.classes == [class_dir_name(k) for k in range(4)]
    for path, label in folder.samples:
        index = int(Path(path).stem)
        image, expected_label, mask = source.sample(index)
        assert label == expected_label
        loaded, loaded_label = folder[folder.samples.index((path, label))]
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))
        mask_file = masks_root(root) / Path(path).relative_to(root)
        np.testing.assert_array_equal(np.asarray(Image.open(mask_file)) > 127, mask)


def test_image_folder_labels_follow_first_level_folders(tmp_path):
    for rel in ["b/sub/deep/y.png", "a/x.PNG", "a/z.jpeg", "b/w.gif"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / rel)
    (tmp_path / "c_empty").mkdir()
    (tmp_path / ".cache").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".cache" / "hidden.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["a", "b", "c_empty"]
    assert [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in ds.samples] == [
        ("a/x.PNG", 0),
        ("a/z.jpeg", 0),
        ("b/sub/deep/y.png", 1),
        ("b/w.gif", 1),
    ]
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")  # one image outside any folder
    unlabelled = ImageFolder(tmp_path)
    assert unlabelled.classes == [] and {y for _, y in unlabelled.samples} == {-1}
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "c_empty")
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "missing")


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size; Pillow reads the size before any pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    noise.save(root / "good.jpg")
    noise.save(root / "good.png")
    noise.save(root / "GOOD_UPPER.JPEG")
    noise.save(root / "good.bmp")
    noise.save(root / "good.webp")
    noise.save(root / "good.tif")
    full = _jpeg_bytes(noise)
    (root / "bad_truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "bad_empty.jpg").write_bytes(b"")
    (root / "bad_text.jpg").write_text("<html>404 not found</html>")
    (root / "bad_bomb.png").write_bytes(_bomb_png(30_000, 30_000))
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(root / "cmyk.jpg")  # pure cyan ink
    gray16 = np.array([[0, 100 * 257, 65535, 32768]], dtype=np.uint16)
    Image.fromarray(gray16).save(root / "gray16.png")
    palette = Image.new("P", (4, 2), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 red, 1 green
    palette.paste(1, (2, 0, 4, 2))
    palette.save(root / "palette.png", transparency=0)  # red is the transparent index
    Image.new("RGB", (1, 1), (1, 2, 3)).save(root / "tiny.png")
    Image.new("L", (8, 8), 77).save(root / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(root / "rotated.jpg", exif=exif.tobytes())
    Image.new("RGB", (6000, 4000), (30, 60, 90)).save(root / "large.jpg", quality=50)
    return root


BAD = {"bad_truncated.jpg", "bad_empty.jpg", "bad_text.jpg", "bad_bomb.png"}


def test_image_folder_skips_unreadable_files_and_loads_the_rest(messy_folder, caplog):
    ds = ImageFolder(messy_folder, size_hint=256)
    assert len(ds) == 17
    with caplog.at_level(logging.WARNING, logger="dino_core.data.folder"):
        items = {Path(path).name: ds[i] for i, (path, _) in enumerate(ds.samples)}
    assert {name for name, item in items.items() if item is None} == BAD
    assert ds.num_skipped == len(BAD)
    for name in BAD:
        assert name in caplog.text
    for name, item in items.items():
        if item is not None:
            image, label = item
            assert image.mode == "RGB" and label == -1, name
    ds[ds.samples.index((str(messy_folder / "bad_empty.jpg"), -1))]
    assert ds.num_skipped == len(BAD)  # counted per file, not per access

    assert items["tiny.png"][0].size == (1, 1)
    assert items["rotated.jpg"][0].size == (20, 40)  # EXIF orientation 6 transposes
    # Draft mode: decoded at 1/8 scale, still >= the size hint on both sides.
    assert items["large.jpg"][0].size == (750, 500)
    np.testing.assert_array_equal(np.asarray(items["gray.png"][0])[0, 0], [77, 77, 77])
    cyan = np.asarray(items["cmyk.jpg"][0]).reshape(-1, 3).mean(0)
    assert cyan[0] < 10 and cyan[1] > 245 and cyan[2] > 245
    gray16 = np.asarray(items["gray16.png"][0])[0]
    np.testing.assert_array_equal(gray16[:, 0], [0, 100, 255, 128])  # scaled, not clipped
    palette = np.asarray(items["palette.png"][0])
    np.testing.assert_array_equal(palette[0, 0], [0, 0, 0])  # transparent -> black
    np.testing.assert_array_equal(palette[0, 3], [0, 255, 0])


def test_load_rgb_large_jpeg_full_size_without_hint(messy_folder):
    assert load_rgb(messy_folder / "large.jpg").size == (6000, 4000)
    assert load_rgb(io.BytesIO((messy_folder / "tiny.png").read_bytes())).size == (1, 1)


def test_load_rgb_refuses_bombs_even_with_pillow_limit_disabled(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(io.BytesIO(_bomb_png(30_000, 30_000)))


# ---------------------------------------------------------------------------- collate


def test_collate_multicrop_drops_none_and_stacks_views():
    def item(label):
        return [
            torch.full((3, 8, 8), float(label)),
            torch.zeros(3, 8, 8),
            torch.ones(3, 4, 4),
        ], label

    images, labels, skipped = collate_multicrop([item(1), None, item(2), None, item(3)])
    assert skipped == 2
    assert [tuple(x.shape) for x in images] == [(3, 3, 8, 8), (3, 3, 8, 8), (3, 3, 4, 4)]
    assert labels.dtype == torch.long and labels.tolist() == [1, 2, 3]
    assert images[0][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]  # view order kept per sample

    with pytest.raises(ValueError, match="number of views"):
        collate_multicrop([item(1), ([torch.zeros(3, 8, 8)], 2)])


def test_collate_single_tensor_and_all_none():
    images, labels, skipped = collate_multicrop(
        [(torch.zeros(3, 5, 5), 0), None, (torch.ones(3, 5, 5), -1)]
    )
    assert images.shape == (2, 3, 5, 5) and labels.tolist() == [0, -1] and skipped == 1
    images, labels, skipped = collate_multicrop([None, None])
    assert images == [] and labels.shape == (0,) and labels.dtype == torch.long and skipped == 2


def test_dataloader_over_messy_folder_counts_skips(messy_folder):
    ds = ImageFolder(messy_folder, transform=eval_transform(size=16), size_hint=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_multicrop)
    seen = skipped = 0
    for images, labels, n_skipped in loader:
        seen += labels.numel()
        skipped += n_skipped
        if labels.numel():
            assert images.shape == (labels.numel(), 3, 16, 16)
    assert (seen, skipped) == (len(ds) - len(BAD), len(BAD))
