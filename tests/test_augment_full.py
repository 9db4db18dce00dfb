"""Full-image crops: per-image box sampler vs torchvision, padded batches, decoding.

The box distributions are compared with torchvision's own ``RandomResizedCrop.get_params`` by a
two-sample Kolmogorov-Smirnov statistic; two deliberately wrong samplers (boxes drawn on the
square canvas, height and width swapped) must fail the same check, so it can fail. Decoding is
compared with Pillow; nvJPEG itself only runs where CUDA is available, its routing (one batch,
then one by one when the batch fails) is checked on the CPU with torchvision's CPU decoder
standing in for it.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.io as tio
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

import dino_core.augment.batched as ab
import dino_core.augment.full as af
from dino_core.augment.batched import BatchedMultiCrop, sample_boxes, sample_boxes_sized
from dino_core.augment.full import (
    decode_images,
    full_image_views,
    pad_batch,
)
from dino_core.data.folder import load_rgb

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 5000  # boxes per distribution: KS noise ~0.02, a real bug moves it by > 0.1
KS_MAX = 0.05  # about the 1e-4 critical value of the two-sample KS statistic at 5000 vs 5000
SIZES = [(300, 120), (120, 300), (500, 375)]  # (height, width)
RATIO = (3 / 4, 4 / 3)


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    at = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, at, side="right") / len(a)
    cdf_b = np.searchsorted(b, at, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _area_and_log_ratio(boxes: np.ndarray, height: int, width: int):
    h, w = boxes[:, 2].astype(float), boxes[:, 3].astype(float)
    return h * w / (height * width), np.log(w / h)


def _torchvision_boxes(height: int, width: int, scale, n: int = N) -> np.ndarray:
    image = torch.empty(1, height, width)
    return np.array([T.RandomResizedCrop.get_params(image, scale, RATIO) for _ in range(n)])


def _sample_boxes_before_refactor(n, height, width, scale, generator=None, ratio=RATIO, tries=10):
    """``augment_batched.sample_boxes`` as it was before the per-image sizes, verbatim."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    s = torch.empty(n, tries, dtype=torch.float64).uniform_(*scale, generator=generator)
    r = torch.empty(n, tries, dtype=torch.float64).uniform_(log_lo, log_hi, generator=generator)
    w = torch.sqrt(area * s * r.exp()).round().long()
    h = torch.sqrt(area * s / r.exp()).round().long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    fits = valid.any(dim=1)
    w, h = torch.where(fits, w, fw), torch.where(fits, h, fh)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(fits, (u[:, 0] * (height - h + 1)).floor().long(), (height - h) // 2)
    left = torch.where(fits, (u[:, 1] * (width - w + 1)).floor().long(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


# ---------------------------------------------------------------------------- box sampler


def test_ks_statistic_is_the_textbook_one():
    x = np.arange(10.0)
    assert ks_statistic(x, x) == 0 and ks_statistic(x, x + 100) == 1
    assert ks_statistic(np.array([0.0, 2.0]), np.array([1.0, 3.0])) == 0.5
    stats = pytest.importorskip("scipy.stats")
    a, b = np.random.default_rng(0).normal(size=(2, 300))
    assert ks_statistic(a, b + 0.1) == pytest.approx(stats.ks_2samp(a, b + 0.1).statistic)


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)], ids=["global", "local"])
def test_sized_boxes_match_torchvisions_distribution_and_wrong_samplers_do_not(scale):
    torch.manual_seed(0)  # torchvision's sampler draws from the default generator
    # all three sizes interleaved in one call: each crop must use its own image's size
    sizes = torch.tensor(SIZES).repeat(N, 1)
    boxes = sample_boxes_sized(sizes, scale, _seed(1)).numpy()
    for k, (height, width) in enumerate(SIZES):
        ref_area, ref_ratio = _area_and_log_ratio(
            _torchvision_boxes(height, width, scale), height, width
        )
        area, ratio = _area_and_log_ratio(boxes[k :: len(SIZES)], height, width)
        assert ks_statistic(area, ref_area) < KS_MAX, (height, width)
        assert ks_statistic(ratio, ref_ratio) < KS_MAX, (height, width)
        # the canvas bug: boxes drawn on the centred square, areas measured on the image
        side = min(height, width)
        square = sample_boxes(N, side, side, scale, _seed(2)).numpy()
        assert ks_statistic(_area_and_log_ratio(square, height, width)[0], ref_area) > KS_MAX
        if height != width and scale[1] == 1.0:  # large crops of a long image are long
            swapped = boxes[k :: len(SIZES)][:, [1, 0, 3, 2]]
            swapped_ratio = _area_and_log_ratio(swapped, height, width)[1]
            assert ks_statistic(swapped_ratio, ref_ratio) > KS_MAX


def test_sized_boxes_fall_back_like_torchvision_per_image():
    # 90% of a 40 x 400 (or 400 x 40) image cannot be cut at a ratio within [3/4, 4/3]
    sizes = torch.tensor([(40, 400), (400, 40), (64, 64), (40, 400)])
    boxes = sample_boxes_sized(sizes, (0.9, 1.0), _seed(0))
    for size, box in zip(sizes.tolist(), boxes.tolist()):
        if size[0] != size[1]:
            torch.manual_seed(0)  # the fallback is deterministic: any seed gives it
            assert box == list(
                T.RandomResizedCrop.get_params(torch.empty(1, *size), (0.9, 1.0), RATIO)
            )
    assert boxes[0].tolist() == [0, 173, 40, 53] and boxes[1].tolist() == [173, 0, 53, 40]
    assert boxes[2, 2] * boxes[2, 3] >= 0.9 * 64 * 64 - 64  # the square one fits normally


def test_sized_boxes_stay_inside_their_own_images():
    g = _seed(3)
    sizes = torch.randint(1, 400, (3000, 2), generator=g)
    sizes[:4] = torch.tensor([(1, 1), (1, 399), (399, 1), (2, 3)])
    for scale in [(0.05, 0.4), (0.4, 1.0)]:
        top, left, h, w = sample_boxes_sized(sizes, scale, g).T
        assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()


def test_sample_boxes_draws_exactly_what_it_drew_before_the_refactor():
    cases = [(100, 48, 48, (0.4, 1.0)), (100, 40, 64, (0.05, 0.4)), (50, 10, 100, (0.9, 1.0)),
             (80, 100, 10, (0.3, 1.0)), (64, 300, 120, (0.14, 1.0)), (7, 1, 1, (0.05, 1.0))]  # fmt: skip
    for seed in range(4):
        for n, height, width, scale in cases:
            new = sample_boxes(n, height, width, scale, _seed(seed))
            assert torch.equal(
                new, _sample_boxes_before_refactor(n, height, width, scale, _seed(seed))
            )
            constant = torch.tensor([[height, width]]).expand(n, 2)
            assert torch.equal(new, sample_boxes_sized(constant, scale, _seed(seed)))
    # values recorded before the refactor
    assert sample_boxes(3, 40, 64, (0.05, 0.4), _seed(0)).tolist() == [
        [6, 1, 29, 35], [2, 42, 25, 22], [15, 6, 16, 19]]  # fmt: skip
    assert sample_boxes(2, 10, 100, (0.9, 1.0), _seed(0)).tolist() == [[0, 43, 10, 13]] * 2


# ----------------------------------------------------------------- padded batches and crops


def _noise(sizes, seed=0) -> list[torch.Tensor]:
    g = _seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def test_pad_batch_aligns_top_left_and_replicates_edges():
    images = _noise([(5, 7), (8, 3), (2, 2)])
    batch, sizes = pad_batch(images)
    assert batch.shape == (3, 3, 8, 7) and batch.dtype == torch.uint8
    assert sizes.tolist() == [[5, 7], [8, 3], [2, 2]] and sizes.dtype == torch.int64
    for image, padded in zip(images, batch):
        h, w = image.shape[-2:]
        # edge replication is what F.pad's "replicate" does
        expected = F.pad(image[None].float(), (0, 7 - w, 0, 8 - h), mode="replicate")[0]
        assert torch.equal(padded, expected.to(torch.uint8))
    with pytest.raises(ValueError):
        pad_batch([])


def test_crops_inside_a_padded_batch_equal_crops_of_each_image_alone():
    images = _noise([(37, 53), (60, 24), (45, 45), (120, 17)])
    batch, sizes = pad_batch(images)
    aug, views = BatchedMultiCrop(32, 16, 2), 3
    g = _seed(0)
    boxes = sample_boxes_sized(sizes.repeat_interleave(views, 0), (0.05, 1.0), g).double()
    flip = torch.rand(len(boxes), generator=g) < 0.5
    together = aug._crop(batch, {"box": boxes, "flip": flip}, 16)  # image-major crops
    for i, image in enumerate(images):
        mine = slice(i * views, (i + 1) * views)
        alone = aug._crop(image[None], {"box": boxes[mine], "flip": flip[mine]}, 16)
        torch.testing.assert_close(together[mine], alone, atol=1e-5, rtol=0)


def test_views_of_an_image_do_not_depend_on_how_much_padding_surrounds_it():
    aug = BatchedMultiCrop(32, 16, 2)
    for image in _noise([(37, 53), (60, 24)]):
        alone, size = pad_batch([image])
        padded = F.pad(alone.float(), (0, 11, 0, 7), mode="replicate").to(torch.uint8)
        expected = aug(alone, _seed(5))  # the canvas path on the image's own size
        for a, b in zip(aug(padded, _seed(5), sizes=size), expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_batched_multicrop_with_sizes_shapes_and_per_image_boxes(monkeypatch):
    batch, sizes = pad_batch(_noise([(37, 53), (60, 24), (45, 45)]))
    seen = []
    sampler = ab.sample_boxes_sized
    monkeypatch.setattr(ab, "sample_boxes_sized", lambda s, *a: seen.append(s) or sampler(s, *a))
    views = BatchedMultiCrop(32, 16, 4)(batch, _seed(0), sizes=sizes)
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 4
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    # view-major crop arrays: crop v * B + b comes from image b
    assert [s.tolist() for s in seen] == [sizes.repeat(2, 1).tolist(), sizes.repeat(4, 1).tolist()]
    for bad in (sizes[:2], sizes + torch.tensor([0, 100]), sizes * 0):
        with pytest.raises(ValueError, match="sizes"):
            BatchedMultiCrop(32, 16, 4)(batch, _seed(0), sizes=bad)


def test_canvas_path_is_bit_identical_to_before(monkeypatch):
    images = _noise([(40, 48)] * 5, seed=1)
    images = torch.stack(images)
    aug = BatchedMultiCrop(32, 16, 4)
    now = aug(images, _seed(3))
    same_sizes = aug(images, _seed(3), sizes=torch.tensor([[40, 48]] * 5))

    def old_sampler(sizes, scale, generator):
        assert (sizes == sizes[0]).all()
        return _sample_boxes_before_refactor(len(sizes), *sizes[0].tolist(), scale, generator)

    monkeypatch.setattr(ab, "sample_boxes_sized", old_sampler)
    before = aug(images, _seed(3))
    assert len(now) == len(before) == len(same_sizes) > 0
    assert all(torch.equal(a, b) for a, b in zip(now, before))
    assert all(torch.equal(a, b) for a, b in zip(now, same_sizes))


# ------------------------------------------------------------------------------ decoding


def _photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 40, (height, width, 1))
    rgb = np.stack([x * 200 / width, y * 200 / height, (x + y) % 50 * 4], -1) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).convert(mode)


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _truncated_jpeg() -> torch.Tensor:
    """A JPEG whose header parses but whose scan data stops half-way."""
    data = _encode(_photo(120, 80), quality=90)
    return data[: len(data) // 2]


def _pillow(data: torch.Tensor) -> torch.Tensor:
    return TF.pil_to_tensor(load_rgb(io.BytesIO(data.numpy().tobytes())))


def _spy_on_pillow(monkeypatch) -> list[int]:
    calls = []
    real = af.load_rgb
    monkeypatch.setattr(af, "load_rgb", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_cpu_decode_of_jpegs_equals_pillows(monkeypatch):
    pillow_calls = _spy_on_pillow(monkeypatch)
    encoded = [_encode(_photo(90, 50), quality=90), _encode(_photo(41, 77, "L"), quality=90)]
    decoded = decode_images(encoded, "cpu")
    assert pillow_calls == []  # both went through torchvision's decoder
    for data, image in zip(encoded, decoded):
        expected = _pillow(data)
        assert image.dtype == torch.uint8 and image.shape == expected.shape
        assert (image.float() - expected.float()).abs().mean() < 1.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_photo(30, 20), quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data.numpy().tobytes())))
    assert torch.equal(decode_images([data])[0], TF.pil_to_tensor(upright.convert("RGB")))


def test_png_and_cmyk_go_through_pillow_and_garbage_gives_none(monkeypatch, caplog):
    pillow_calls = _spy_on_pillow(monkeypatch)
    rgba = _photo(33, 21, "RGBA")
    rgba.putalpha(128)
    png, cmyk = _encode(rgba, "PNG"), _encode(_photo(40, 30, "CMYK"), quality=95)
    garbage = torch.tensor(list(b"<html>not an image</html>"), dtype=torch.uint8)
    truncated = _truncated_jpeg()
    with caplog.at_level(logging.WARNING, logger="dino_core.augment.full"):
        out = decode_images([png, cmyk, garbage, truncated], "cpu")
    assert len(pillow_calls) == 4  # the truncated JPEG failed the fast decoder first
    assert torch.equal(out[0], _pillow(png)) and torch.equal(out[1], _pillow(cmyk))
    assert out[2] is None and out[3] is None
    assert sum("unreadable" in r.message for r in caplog.records) == 2


def test_max_short_side_downscales_keeping_the_aspect():
    landscape, portrait = _encode(_photo(90, 50), quality=95), _encode(_photo(30, 64), "PNG")
    small = _encode(_photo(16, 12), quality=95)
    out = decode_images([landscape, portrait, small], "cpu", max_short_side=20)
    assert [tuple(x.shape) for x in out] == [(3, 20, 36), (3, 42, 20), (3, 12, 16)]
    expected = TF.resize(_pillow(landscape), [20], interpolation=TF.InterpolationMode.BICUBIC)
    assert (out[0].float() - expected.float()).abs().mean() < 1.0
    assert torch.equal(out[2], _pillow(small))


def test_cuda_route_decodes_jpegs_in_one_batch_then_one_by_one(monkeypatch):
    # nvJPEG cannot run here: torchvision's CPU decoder stands in, with the same contract
    # (a list in, a list out, nothing returned if any image fails).
    calls = []
    real = tio.decode_jpeg

    def stand_in(data, mode, device):
        assert torch.device(device).type == "cuda"
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, mode=mode)

    monkeypatch.setattr(tio, "decode_jpeg", stand_in)
    good = [_encode(_photo(90, 50), quality=90), _encode(_photo(41, 77, "L"), quality=90)]
    assert [x.shape for x in decode_images(good, "cuda")] == [(3, 50, 90), (3, 77, 41)]
    assert calls == [2]
    calls.clear()
    truncated = _truncated_jpeg()
    out = decode_images([good[0], truncated, good[1]], "cuda")
    assert calls == [3, 1, 1, 1] and out[1] is None
    assert (out[0].float() - _pillow(good[0]).float()).abs().mean() < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_decode_matches_the_cpu():
    exif = Image.Exif()
    exif[0x0112] = 6
    encoded = [_encode(_photo(90, 50), quality=90), _encode(_photo(41, 77, "L"), quality=90),
               _encode(_photo(64, 48), quality=90, exif=exif.tobytes()), _encode(_photo(20, 30), "PNG")]  # fmt: skip
    on_gpu, on_cpu = decode_images(encoded, "cuda", 40), decode_images(encoded, "cpu", 40)
    for a, b in zip(on_gpu, on_cpu):
        assert a.device.type == "cuda" and a.shape == b.shape
        assert (a.cpu().float() - b.float()).abs().mean() < 2.0


# -------------------------------------------------------------------- the convenience


def test_full_image_views_drops_unreadable_images():
    aug = BatchedMultiCrop(32, 16, 2)
    encoded = [_encode(_photo(90, 50)), torch.tensor([1, 2, 3], dtype=torch.uint8),
               _encode(_photo(30, 64), "PNG")]  # fmt: skip
    views, kept = full_image_views(aug, encoded, "cpu", _seed(0), max_short_side=40)
    assert kept.tolist() == [True, False, True]
    assert [tuple(v.shape) for v in views] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2
    assert all(torch.isfinite(v).all() for v in views)
    again, _ = full_image_views(aug, encoded, "cpu", _seed(0), max_short_side=40)
    assert len(again) == len(views)
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    views, kept = full_image_views(aug, encoded[1:2], "cpu", _seed(0))
    assert kept.tolist() == [False]
    assert [tuple(v.shape) for v in views] == [(0, 3, 32, 32)] * 2 + [(0, 3, 16, 16)] * 2
