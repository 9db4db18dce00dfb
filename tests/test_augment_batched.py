"""Batched multi-crop augmentation: layout, reproducibility, per-op numerics, probabilities.

Each colour op is compared with ``torchvision.transforms.v2.functional`` on the same input and
factor. The probability tests feed synthetic images on which one op is visible whatever the
others do (every photometric op except the blur maps grey levels through one monotone
function per crop, and never makes a colour image grey), and the box sampler is checked
directly against RandomResizedCrop's ranges and its fallback.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

import dino_core.augment.batched as ab
from dino_core.augment.batched import (
    BatchedMultiCrop,
    ToCanvas,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    decode_to_canvas,
    gaussian_blur,
    grayscale,
    sample_boxes,
    solarize,
)
from dino_core.augment.per_image import IMAGENET_MEAN, IMAGENET_STD
from dino_core.augment.per_image import gaussian_blur as per_image_blur
from dino_core.data.collate import collate_multicrop
from dino_core.data.procedural import ProceduralShapes

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
N_LOCAL = 4
N = 600  # images per statistical test: binomial std at p=0.5 is 0.02, bounds at >= 3.5 std


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small() -> BatchedMultiCrop:
    return BatchedMultiCrop(global_size=32, local_size=16, n_local=N_LOCAL)


def _run(images: torch.Tensor, seed: int = 0, aug: BatchedMultiCrop | None = None):
    return (aug or _small())(images, torch.Generator().manual_seed(seed))


def _unnormalise(view: torch.Tensor) -> torch.Tensor:
    return view * STD + MEAN


def _colour_image(n: int = 5, height: int = 40, width: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------- layout and reproducibility


def test_views_count_order_shapes_dtype_device():
    images = _colour_image()
    views = _run(images)
    assert len(views) == 2 + N_LOCAL
    assert [tuple(v.shape) for v in views] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * N_LOCAL
    assert all(v.dtype == torch.float32 and v.device == images.device for v in views)
    assert all(v.is_contiguous() and torch.isfinite(v).all() for v in views)
    # float input in [0, 1] is the same image as uint8 input
    as_float = _run(images.float() / 255)
    for a, b in zip(views, as_float):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_seeded_generator_reproduces_and_seeds_differ():
    images = _colour_image()
    first, again, other = _run(images, 3), _run(images, 3), _run(images, 4)
    assert len(first) == len(again) > 0
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_chunking_and_blur_method_do_not_change_results(monkeypatch):
    # One chunk per image (CPU default for big crops) vs the whole batch at once (the GPU
    # path), and the conv blur used off-CPU vs the shifted adds used on CPU.
    images = _colour_image()
    chunked = _run(images, aug=BatchedMultiCrop(32, 16, N_LOCAL, cpu_chunk_elements=1))
    blur = ab.gaussian_blur
    monkeypatch.setattr(ab, "gaussian_blur", lambda x, s: blur(x, s, method="conv"))
    whole = _run(images, aug=BatchedMultiCrop(32, 16, N_LOCAL, cpu_chunk_elements=2**40))
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        _small()(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="local_scale"):
        BatchedMultiCrop(local_scale=(0.5, 0.2))


# ---------------------------------------------------------------------------- crop boxes


@pytest.mark.parametrize(("height", "width"), [(48, 48), (40, 64)])
@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_boxes_within_scale_and_ratio(height, width, scale):
    boxes = sample_boxes(4000, height, width, scale, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # Rounding w and h to whole pixels moves area and ratio by up to half a pixel per side.
    area = (h * w).double() / (height * width)
    slack_area = (h + w).double() / (height * width)
    assert (area >= scale[0] - slack_area).all() and (area <= scale[1] + slack_area).all()
    ratio = w.double() / h
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    # Same distribution as torchvision's sampler: compare mean area fraction and mean ratio.
    torch.manual_seed(0)
    ref = torch.tensor(
        [
            T.RandomResizedCrop.get_params(torch.empty(1, height, width), scale, (3 / 4, 4 / 3))
            for _ in range(2000)
        ]
    ).double()
    ref_area = ref[:, 2] * ref[:, 3] / (height * width)
    assert abs(area.mean() - ref_area.mean()) < 0.02
    assert abs(ratio.mean() - (ref[:, 3] / ref[:, 2]).mean()) < 0.02


def test_boxes_fall_back_to_torchvisions_centre_crop():
    # 90% of a 10 x 100 image cannot be cut at ratio <= 4/3: every try fails.
    boxes = sample_boxes(50, 10, 100, (0.9, 1.0), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    expected = T.RandomResizedCrop.get_params(torch.empty(1, 10, 100), (0.9, 1.0), (3 / 4, 4 / 3))
    assert (boxes == torch.tensor(expected)).all()


def test_crop_resamples_the_box_and_flips():
    image = torch.rand(1, 3, 24, 30)
    aug = _small()
    full = {
        "box": torch.tensor([[0.0, 0, 24, 30]], dtype=torch.float64),
        "flip": torch.tensor([False]),
    }
    resized = F.interpolate(image, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(aug._crop(image, full, 16), resized, atol=1e-5, rtol=0)
    # a 16 x 16 box at scale 1 samples pixel centres exactly; a flip mirrors it
    box = {
        "box": torch.tensor([[5.0, 7, 16, 16]], dtype=torch.float64),
        "flip": torch.tensor([True]),
    }
    crop = image[..., 5:21, 7:23]
    torch.testing.assert_close(aug._crop(image, box, 16), crop.flip(-1), atol=1e-5, rtol=0)


# --------------------------------------------------------------- colour ops vs torchvision


def _photo(n: int = 4) -> torch.Tensor:
    """Random colours plus grey pixels, ties between channels, black and white."""
    x = torch.rand(n, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    x[:, :, :4] = x[:, :1, :4]  # grey
    x[:, 1, 4:6] = x[:, 0, 4:6]  # R = G
    x[:, 2, 6:8] = x[:, 1, 6:8]  # G = B
    x[:, :, 8, :3], x[:, :, 9, :3] = 0.0, 1.0
    return x


OPS = [
    (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
    (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
    (adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2]),
    (adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.03, 0.1, 0.5]),
]


@pytest.mark.parametrize(
    ("ours", "reference", "factors"), OPS, ids=lambda v: getattr(v, "__name__", "")
)
def test_colour_ops_match_torchvision(ours, reference, factors):
    x = _photo(len(factors))
    out = ours(x, torch.tensor(factors))  # a different factor per crop
    expected = torch.stack([reference(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(out, expected, atol=1 / 255, rtol=0)
    assert (out - expected).abs().max() < 1e-5  # float maths: equal up to rounding
    # On uint8 images torchvision truncates after each op: still within 1.5 grey levels.
    x8 = (x * 255).round().to(torch.uint8)
    expected8 = torch.stack([reference(x8[i], f) for i, f in enumerate(factors)])
    assert (ours(x8 / 255.0, torch.tensor(factors)) * 255 - expected8).abs().max() <= 1.5


def test_grayscale_solarize_blur_match_references():
    x = _photo()
    torch.testing.assert_close(grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(solarize(x), TF.solarize(x, 0.5), atol=0, rtol=0)
    torch.testing.assert_close(solarize(x, 0.3), TF.solarize(x, 0.3), atol=0, rtol=0)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    expected = torch.stack([per_image_blur(x[i], float(s)) for i, s in enumerate(sigma)])
    for method in ("shift", "conv"):
        torch.testing.assert_close(
            gaussian_blur(x, sigma, method=method), expected, atol=1e-5, rtol=0
        )


def test_jitter_applies_the_four_ops_in_each_crops_own_order():
    x = _photo(6)
    order = torch.tensor(
        [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2], [0, 1, 2, 3], [3, 1, 0, 2]]
    )
    factor = torch.tensor([[1.3, 0.7, 1.2, 0.08]] * 6)
    off = torch.zeros(6, dtype=torch.bool)
    p = {
        "jitter": torch.tensor([True] * 5 + [False]),
        "order": order,
        "factor": factor,
        "gray": off,
        "blur": off,
        "solarize": off,
        "sigma": torch.ones(6),
    }
    out = torch.empty(1, 6, 3, 20, 24)
    _small()._photometric(x.clone(), p, out)
    reference_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(6):
        expected = x[i]
        for op in order[i].tolist() if p["jitter"][i] else []:
            expected = reference_ops[op](expected, float(factor[i, op]))
        torch.testing.assert_close(_unnormalise(out[0, i : i + 1])[0], expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------- probabilities per view


def _rates(event, views) -> list[float]:
    return [float(event(_unnormalise(v)).float().mean()) for v in views]


def test_flip_rate_is_half():
    # A horizontal grey ramp, dark enough that no jitter reaches solarization's 0.5: every
    # other op keeps it increasing left to right, so a falling ramp means a flip.
    ramp = torch.linspace(13, 64, 48).round().to(torch.uint8)
    images = ramp.expand(N, 3, 48, 48).contiguous()
    views = _run(images)

    def flipped(v):
        return v[..., :8].mean(dim=(1, 2, 3)) > v[..., 8:].mean(dim=(1, 2, 3))

    rates = _rates(flipped, views)
    assert len(rates) == len(views) > 0
    assert all(abs(rate - 0.5) < 0.08 for rate in rates)


def test_grayscale_jitter_and_solarize_rates():
    # Colour noise never turns grey through jitter (saturation >= 0.8), so equal channels
    # mean RandomGrayscale fired.
    views = _run(_colour_image(N, 48, 48))

    def grey(v):
        return (v.amax(dim=1) - v.amin(dim=1)).amax(dim=(1, 2)) < 1e-4

    rates = _rates(grey, views)
    assert len(rates) == len(views) > 0
    assert all(abs(rate - 0.2) < 0.06 for rate in rates)
    # A flat light grey (230): crops, contrast, saturation, hue, grayscale and blur leave
    # it alone; brightness moves it (p=0.8) but keeps it >= 0.54, and only solarization
    # takes it below 0.5.
    views = _run(torch.full((N, 3, 48, 48), 230, dtype=torch.uint8), seed=1)
    level = [_unnormalise(v)[:, 0, 8, 8] for v in views]
    solarized = [float((v < 0.5).float().mean()) for v in level]
    assert solarized[0] == 0 and all(rate == 0 for rate in solarized[2:])
    assert abs(solarized[1] - 0.2) < 0.06
    jittered = [float(((v - 230 / 255).abs() > 1e-4).float().mean()) for v in level]
    assert abs(jittered[0] - 0.8) < 0.06 and all(abs(r - 0.8) < 0.06 for r in jittered[2:])
    bright = level[0] * 255 / 230  # global1: brightness factor, clamped at 255 / 230
    assert bright.min() >= 0.6 - 1e-4 and bright.max() <= 255 / 230 + 1e-4


def _high_frequency_energy(v: torch.Tensor) -> torch.Tensor:
    return (v.diff(dim=-1) ** 2).sum(dim=(1, 2, 3)) + (v.diff(dim=-2) ** 2).sum(dim=(1, 2, 3))


def test_blur_always_on_global1_rarely_on_global2_half_on_locals(monkeypatch):
    # 2 x 2 px checkerboard; the same seed with the blur switched off gives the same crops
    # and colours, so any difference is the blur. A blur is invisible when the neighbour
    # weight exp(-0.5 / sigma^2) < ~1e-4, i.e. sigma < ~0.23: 93% of blurs are seen.
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    board = (((yy // 2 + xx // 2) % 2) * 160 + 40).to(torch.uint8)
    images = board.expand(N, 3, 48, 48).contiguous()
    blurred = _run(images, seed=5)
    monkeypatch.setattr(ab, "gaussian_blur", lambda x, sigma: x)
    sharp = _run(images, seed=5)
    changed = [
        float(((a - b).abs().amax(dim=(1, 2, 3)) > 1e-3).float().mean())
        for a, b in zip(blurred, sharp)
    ]
    visible = (2.0 - 0.23) / (2.0 - 0.1)
    assert changed[0] > visible - 0.05
    assert abs(changed[1] - 0.1 * visible) < 0.04
    assert len(changed) > 2
    assert all(abs(rate - 0.5 * visible) < 0.07 for rate in changed[2:])
    # and a blur only ever removes high-frequency energy (global1: no solarization after it)
    energy_ratio = _high_frequency_energy(blurred[0]) / _high_frequency_energy(sharp[0])
    assert (energy_ratio <= 1 + 1e-4).all() and energy_ratio.median() < 0.5


def test_jitter_factor_ranges_and_hue_shift():
    jitter = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    expected = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    assert [pytest.approx(r) for r in ab.JITTER_RANGES] == [list(r) for r in expected]
    # Flat dark red: in views without solarization, every op but the hue jitter keeps the hue
    # at 0 (grey blends and clamps at 0 only move it towards 0; too dark to clamp at 255),
    # so output hues span [-0.1, 0.1] turn.
    red = torch.zeros(N // 2, 3, 48, 48, dtype=torch.uint8)
    red[:, 0] = 100
    views = _run(red, seed=2)
    pixels = torch.cat([_unnormalise(v)[:, :, 8, 8] for v in views[:1] + views[2:]])
    chroma = pixels.amax(dim=1) - pixels.amin(dim=1)
    pixels = pixels[chroma > 0.05]
    assert (pixels.argmax(dim=1) == 0).all()
    hue = (pixels[:, 1] - pixels[:, 2]) / (pixels[:, 0] - pixels[:, 1:].amin(dim=1)) / 6
    assert hue.abs().max() <= 0.1 + 1e-3
    assert hue.min() < -0.09 and hue.max() > 0.09


# ---------------------------------------------------------------------------------- canvas


def test_decode_to_canvas_resizes_shorter_side_and_centre_crops():
    image = Image.new("RGB", (90, 60))
    image.paste((255, 0, 0), (0, 0, 15, 60))  # a red band on the left, cut off by the crop
    image.paste((0, 0, 255), (15, 0, 90, 60))
    canvas = decode_to_canvas(image.convert("P"), 40)
    assert canvas.shape == (3, 40, 40) and canvas.dtype == torch.uint8
    assert canvas[0].float().mean() < 10 and canvas[2].float().mean() > 245


def test_canvas_transform_feeds_batched_views_through_a_dataloader():
    transform = pickle.loads(pickle.dumps(ToCanvas(48)))  # DataLoader workers pickle it
    dataset = ProceduralShapes(6, image_size=40, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_multicrop)
    images, labels, skipped = next(iter(loader))
    assert images.shape == (3, 3, 48, 48) and images.dtype == torch.uint8 and skipped == 0
    views = _run(images)
    assert len(views) == 2 + N_LOCAL and views[0].shape == (3, 3, 32, 32)
    assert not math.isnan(float(views[-1].sum()))
