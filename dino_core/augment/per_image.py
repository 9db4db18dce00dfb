"""DINO multi-crop augmentation (Caron et al., 2021, Sec. 3.1 and Appendix D).

Each image yields two global views (224 px, 40-100% of the area) and ``n_local`` local
views (96 px, 5-40%). The teacher sees only the global views, the student sees all of
them, which is what forces "local-to-global" correspondences. The photometric chain is
BYOL's (Grill et al., 2020): flip, colour jitter, grayscale, then an asymmetric pair of
blur/solarization settings for the two global views.

The ops are torchvision ``transforms.v2`` on ``uint8`` tensors: the image is converted once,
every crop, resize and colour op stays in uint8 (torch's native uint8 bicubic resize is 3x
faster than Pillow's here), and only the last step converts to normalised ``float32``. The blur
is our own separable version of ``v2.GaussianBlur`` (8x faster, same output within one grey
level); the hue jitter is then the most expensive op. All randomness comes from torch's
generator, so ``torch.manual_seed`` and the DataLoader's per-worker seeding cover it (the
reference draws its blur radius from Python's ``random``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import tv_tensors

from dino_core.specs import MULTICROP, MultiCropSpec  # noqa: F401 - re-exported

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The reference blurs with PIL's ImageFilter.GaussianBlur(radius=U(0.1, 2.0)); PIL's radius
# is the standard deviation in *pixels* and PIL needs no kernel size. v2.GaussianBlur does:
# 2 * ceil(3 * sigma_max) + 1 = 13 keeps +-3 sigma of the widest kernel (99.7% of its mass,
# differences to a 23-tap kernel are at most 1 grey level). Because sigma is in pixels of the
# *output* crop, the same kernel is right for 224 and 96 px crops: shrinking the kernel for
# local crops, as "23 at 224" rules of thumb suggest, would truncate the blur there.
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1

# Solarize inverts pixels >= threshold; the colour ops run on uint8, so the reference's
# PIL threshold of 128 applies unchanged (augment_batched's SOLARIZE_THRESHOLD_FLOAT, 0.5).
SOLARIZE_THRESHOLD_UINT8 = 128




def gaussian_blur(
    image: torch.Tensor, sigma: float, kernel_size: int = BLUR_KERNEL
) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, the kernel of ``v2.GaussianBlur``.

    v2's kernel convolves with the full ``k x k`` window (6.6 ms for a 224 px crop on one
    core, the most expensive op of the chain); two 1-D passes of shifted adds give the same
    output within one grey level at about 0.8 ms.

    Args:
        image: ``(C, H, W)`` uint8 or float tensor.
        sigma: Standard deviation in pixels.
        kernel_size: Odd number of taps; clamped so the padding fits small images.

    Returns:
        Tensor of the input's shape and dtype (uint8 is rounded back).
    """
    height, width = image.shape[-2:]
    half = min(kernel_size // 2, height - 1, width - 1)
    taps = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights: list[float] = (kernel / kernel.sum()).tolist()
    x = image if image.is_floating_point() else image.float()
    x = F.pad(x.unsqueeze(0), (half, half, half, half), mode="reflect").squeeze(0)
    rows = x[..., :, 0:width] * weights[0]
    for j in range(1, 2 * half + 1):
        rows.add_(x[..., :, j : j + width], alpha=weights[j])
    out = rows[..., 0:height, :] * weights[0]
    for j in range(1, 2 * half + 1):
        out.add_(rows[..., j : j + height, :], alpha=weights[j])
    if image.is_floating_point():
        return out.to(image.dtype)
    return out.round_().clamp_(0, 255).to(image.dtype)


class GaussianBlur(T.Transform):
    """Blur with ``sigma ~ U(sigma_min, sigma_max)`` drawn from torch's generator.

    A drop-in for ``v2.GaussianBlur(kernel_size, sigma)`` on tensors, computed separably
    (see :func:`gaussian_blur`).

    Args:
        sigma: ``(min, max)`` of the standard deviation in pixels.
        kernel_size: Odd number of taps.
    """

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA, kernel_size: int = BLUR_KERNEL):
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must satisfy 0 < min <= max, got {sigma}")
        self.sigma = sigma
        self.kernel_size = kernel_size

    def make_params(self, flat_inputs: list) -> dict:
        return {"sigma": torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        if not isinstance(inpt, torch.Tensor):
            raise TypeError(f"GaussianBlur expects a tensor image, got {type(inpt).__name__}")
        out = gaussian_blur(inpt.as_subclass(torch.Tensor), params["sigma"], self.kernel_size)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def _view(
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> T.Compose:
    """Builds the pipeline for one kind of view.

    ``transforms[0]`` is ``ToImage`` (a no-op on tensors), ``transforms[1]`` the
    ``RandomResizedCrop``, so ``T.Compose(view.transforms[2:])`` is the photometric chain
    alone (the tests use it to look at one op at a time).

    Args:
        size: Output side in pixels.
        scale: Range of the crop's area as a fraction of the input image.
        blur_p: Probability of the Gaussian blur.
        solarize_p: Probability of solarization (0 disables the op entirely).
        mean: Per-channel normalisation mean, in [0, 1] units.
        std: Per-channel normalisation std, in [0, 1] units.

    Returns:
        A transform mapping an RGB PIL image or uint8 tensor ``(3, H, W)`` to a float32 tensor
        ``(3, size, size)``.
    """
    ops: list[T.Transform] = [
        T.ToImage(),
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply(
            [T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
        ),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur()], p=blur_p),
    ]
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=SOLARIZE_THRESHOLD_UINT8, p=solarize_p))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose(ops)


def check_multicrop(
    n_local: int, global_scale: tuple[float, float], local_scale: tuple[float, float]
) -> None:
    """Raises ValueError for a crop count or scale range no RandomResizedCrop can draw."""
    if n_local < 0:
        raise ValueError(f"n_local must be >= 0, got {n_local}")
    for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")


class MultiCropAugmentation:
    """Turns one image into DINO's ``2 + n_local`` views.

    Args:
        global_size: Side of the two global crops (paper: 224).
        local_size: Side of the local crops (paper: 96).
        n_local: Number of local crops (paper's best: 10; the reference code defaults to 8).
        global_scale: Area range of global crops. The paper uses (0.4, 1.0) with local crops;
            the reference recommends a wider (0.14, 1.0) when ``n_local=0``.
        local_scale: Area range of local crops (paper: (0.05, 0.4)).
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.

    Example:
        >>> aug = MultiCropAugmentation(n_local=2)
        >>> views = aug(Image.new("RGB", (300, 300)))
        >>> [tuple(v.shape) for v in views]
        [(3, 224, 224), (3, 224, 224), (3, 96, 96), (3, 96, 96)]
    """

    def __init__(
        self,
        global_size: int = MULTICROP.global_size,
        local_size: int = MULTICROP.local_size,
        n_local: int = MULTICROP.n_local,
        global_scale: tuple[float, float] = MULTICROP.global_scale,
        local_scale: tuple[float, float] = MULTICROP.local_scale,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        check_multicrop(n_local, global_scale, local_scale)
        self.n_local = n_local
        # Asymmetric global views (BYOL): view 1 is always blurred and never solarized,
        # view 2 is rarely blurred and sometimes solarized.
        self.global1 = _view(global_size, global_scale, 1.0, 0.0, mean, std)
        self.global2 = _view(global_size, global_scale, 0.1, 0.2, mean, std)
        self.local = _view(local_size, local_scale, 0.5, 0.0, mean, std)

    def __call__(self, image: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        """Draws the views for one image.

        Args:
            image: An RGB PIL image, or a uint8 tensor ``(3, H, W)``. Other PIL modes are
                converted to RGB first.

        Returns:
            ``[global1, global2, local_1, ..., local_n]``: float32 tensors, the globals of
            shape ``(3, global_size, global_size)``, the locals ``(3, local_size, local_size)``.
        """
        if isinstance(image, Image.Image):
            # Convert once here rather than once per view inside ToImage.
            image = TF.to_image(image if image.mode == "RGB" else image.convert("RGB"))
        elif image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 image tensor, got dtype {image.dtype}")
        views = [self.global1(image), self.global2(image)]
        views += [self.local(image) for _ in range(self.n_local)]
        return views


def eval_transform(
    size: int = 224,
    resize_ratio: float = 256 / 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """The deterministic evaluation transform of the reference k-NN / linear evaluation.

    Args:
        size: Side of the centre crop.
        resize_ratio: The shorter side is first resized to ``size * resize_ratio``
            (256 for 224, the standard ImageNet protocol).
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.

    Returns:
        A transform mapping an RGB PIL image or uint8 tensor to float32 ``(3, size, size)``.
    """
    resize_to = int(size * resize_ratio)
    return T.Compose(
        [
            T.Resize(resize_to, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )
