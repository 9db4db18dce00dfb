"""Multi-crop augmentation: views, shapes, the reference's parameters and probabilities.

The probability tests run each view's photometric chain (everything after the crop) on small
synthetic images built so that one op is visible regardless of the others: every op except
the blur is a per-pixel map, so it cannot add grey levels to a two-level image, a flip is the
only op that moves a one-sided pattern, and so on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dino_core.augment.per_image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    eval_transform,
    gaussian_blur,
)

N_TRIALS = 400  # binomial std at p=0.5 is 0.025; bounds below sit at ~4 std
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _photo_image(seed: int = 0, size=(400, 320)) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size)
    pixels = np.asarray(smooth, dtype=np.float32) + rng.normal(0, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undoes ToDtype + Normalize exactly (the chain's values are k / 255)."""
    return ((x * STD + MEAN) * 255).round().to(torch.uint8)


def _photometric(view: T.Compose) -> T.Compose:
    assert isinstance(view.transforms[1], T.RandomResizedCrop)
    return T.Compose(view.transforms[2:])


def _views(aug: MultiCropAugmentation):
    return {"global1": aug.global1, "global2": aug.global2, "local": aug.local}


def _rate(view: T.Compose, image: torch.Tensor, event) -> float:
    chain = _photometric(view)
    return float(np.mean([event(_to_uint8(chain(image))) for _ in range(N_TRIALS)]))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def small_aug():
    torch.manual_seed(0)
    return MultiCropAugmentation(global_size=32, local_size=32, n_local=1)


def test_default_views_count_order_shape_dtype():
    views = MultiCropAugmentation()(_photo_image())
    assert len(views) == 12
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)


@pytest.mark.parametrize("n_local", [0, 3])
def test_custom_sizes_and_inputs(n_local):
    aug = MultiCropAugmentation(global_size=64, local_size=24, n_local=n_local)
    image = _photo_image(size=(90, 70))
    for inp in (image, image.convert("L"), TF.pil_to_tensor(image)):
        views = aug(inp)
        assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 24, 24)] * n_local
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(3, 40, 40))
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropAugmentation(local_scale=(0.5, 0.1))


def test_seeded_torch_makes_views_reproducible():
    aug, image = MultiCropAugmentation(global_size=48, local_size=16, n_local=2), _photo_image()
    torch.manual_seed(7)
    first = aug(image)
    torch.manual_seed(7)
    second = aug(image)
    assert len(first) == len(second) > 0
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_reference_parameters():
    aug = MultiCropAugmentation()
    for view, size, scale in [
        (aug.global1, 224, (0.4, 1.0)),
        (aug.global2, 224, (0.4, 1.0)),
        (aug.local, 96, (0.05, 0.4)),
    ]:
        crop = view.transforms[1]
        assert isinstance(crop, T.RandomResizedCrop)
        assert crop.size == (size, size) and tuple(crop.scale) == scale
        assert crop.interpolation == T.InterpolationMode.BICUBIC
        jitter_apply = next(t for t in view.transforms if isinstance(t, T.RandomApply))
        jitter = jitter_apply.transforms[0]
        assert jitter_apply.p == 0.8 and isinstance(jitter, T.ColorJitter)
        assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
        assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)


def test_normalisation_is_roughly_centred():
    # Pixels drawn around the ImageNet mean colour with ImageNet-like spread.
    rng = np.random.default_rng(1)
    pixels = np.array(IMAGENET_MEAN) * 255 + rng.normal(0, 50, (128, 128, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    torch.manual_seed(0)
    aug = MultiCropAugmentation(global_size=64, local_size=32, n_local=4)
    views = [v for _ in range(10) for v in aug(image)]
    channel_means = torch.stack([v.mean(dim=(1, 2)) for v in views]).mean(0)
    assert channel_means.abs().max() < 0.25, channel_means
    stds = torch.stack([v.std(dim=(1, 2)) for v in views])
    assert 0.2 < stds.mean() < 1.5


def test_flip_probability(small_aug):
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    image[:, :, :8] = 0  # a dark band on the left only

    def flipped(out: torch.Tensor) -> bool:
        cols = out[0].float().mean(0)
        return bool((cols[-1] - cols[16]).abs() > (cols[0] - cols[16]).abs())

    for name, view in _views(small_aug).items():
        assert 0.4 < _rate(view, image, flipped) < 0.6, name


def test_grayscale_probability(small_aug):
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8))

    def gray(out: torch.Tensor) -> bool:
        return bool(torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]))

    for name, view in _views(small_aug).items():
        assert 0.14 < _rate(view, image, gray) < 0.26, name


def test_solarize_only_on_second_global_view(small_aug):
    # White stays >= 153 under any jitter; solarization maps it below 128.
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)

    def solarized(out: torch.Tensor) -> bool:
        return bool(out.float().mean() < 128)

    assert 0.14 < _rate(small_aug.global2, image, solarized) < 0.26
    assert _rate(small_aug.global1, image, solarized) == 0
    assert _rate(small_aug.local, image, solarized) == 0


def test_blur_probabilities(small_aug):
    # A two-level image stays two-level under every per-pixel op; only the blur adds levels.
    # Blurs with sigma below ~0.3 px change no pixel by a grey level, so "always" reads ~0.9.
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, 8:24, 8:24] = 255

    def blurred(out: torch.Tensor) -> bool:
        return out[0].unique().numel() > 2

    assert _rate(small_aug.global1, image, blurred) > 0.8
    assert 0.03 < _rate(small_aug.global2, image, blurred) < 0.16
    assert 0.35 < _rate(small_aug.local, image, blurred) < 0.56


@pytest.mark.parametrize("size", [(3, 224, 224), (3, 96, 96), (3, 17, 30)])
@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_separable_blur_matches_torchvision(size, sigma):
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8))
    ours = gaussian_blur(image, sigma, kernel_size=13)
    ref = TF.gaussian_blur(image, [13, 13], [sigma, sigma])
    assert ours.dtype == torch.uint8 and ours.shape == image.shape
    assert (ours.int() - ref.int()).abs().max() <= 1
    as_float = gaussian_blur(image.float() / 255, sigma, kernel_size=13)
    torch.testing.assert_close(
        as_float, TF.gaussian_blur(image.float() / 255, [13, 13], [sigma, sigma])
    )


def test_blur_lowers_high_frequency_energy():
    checker = (torch.arange(32).view(1, -1) + torch.arange(32).view(-1, 1)) % 2
    image = (checker * 255).to(torch.uint8).expand(3, 32, 32).contiguous()

    def energy(x):
        return (x.float() - x.float().mean()).pow(2).mean()

    assert energy(gaussian_blur(image, 0.1)) == energy(image)  # sigma 0.1 is a no-op
    assert energy(gaussian_blur(image, 1.0)) < 0.01 * energy(image)


def test_eval_transform_shape_and_values():
    x = eval_transform()(_photo_image(size=(500, 300)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    gray = eval_transform(size=64)(Image.new("RGB", (100, 80), (128, 128, 128)))
    assert gray.shape == (3, 64, 64)
    expected = (128 / 255 - MEAN) / STD
    torch.testing.assert_close(gray, expected.expand(3, 64, 64))
