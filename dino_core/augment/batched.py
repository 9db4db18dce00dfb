"""DINO multi-crop augmentation for a whole batch at once, on any device.

The per-image :class:`dino_core.augment.per_image.MultiCropAugmentation` runs in DataLoader workers at
~200 small images (2 x 32 + 4 x 16 px) per second per core, which leaves CPU training
data-bound, and no number of CPU workers keeps an H100 fed at paper sizes. Here one call maps a
uint8 batch ``(B, 3, H, W)`` to all ``2 + n_local`` views with the same distributions (Caron et
al., 2021, Appendix D; BYOL's colour chain), each crop drawing its own parameters: boxes come
from torchvision's RandomResizedCrop sampler, vectorised (:mod:`dino_core.augment.boxes`); one
``F.grid_sample`` resamples many crops; each photometric op runs on the crops that drew it,
with per-crop factors. On one core (``bench/augment.py``) that is ~6,000 small images/s (15x
the reference's PIL pipeline) and ~110 paper-size images/s (2x). Two ways in:

- Canvas: a DataLoader yields square uint8 canvases (:class:`ToCanvas`), the training loop
  moves them to the GPU and calls :class:`BatchedMultiCrop` there.
- Full images: the loop gets encoded bytes and calls
  :func:`dino_core.augment.full.full_image_views`, which decodes them (batched nvJPEG on
  CUDA), pads them into one batch and passes each image's size (``sizes=``), so boxes are
  drawn on each whole image as RandomResizedCrop does.

Deviations from the per-image pipeline, all deliberate:

- Resampling is bilinear without antialiasing; the reference uses bicubic (antialiased on
  tensors). On one CPU core ``grid_sample`` is 3.2x slower in bicubic mode (which has no
  antialiasing either), and ``roi_align(aligned=True, sampling_ratio=2)``, which averages
  2 x 2 bilinear taps, was 3-6x slower than bilinear ``grid_sample``. The paper's crops shrink
  by at most ~1.7x (a 40% local crop of a 256 px canvas to 96 px), where bilinear aliasing
  stays mild, and half of the local crops are blurred anyway. On full images the shrink is
  bounded via ``max_short_side`` (antialiased beforehand; no crop side exceeds 4/3 of it):
  about 8/7 of the global size keeps it near the canvas path's.
- Canvas path only: crops come from a square canvas (:func:`decode_to_canvas`: shorter side
  resized, then centre-cropped), not from the full decoded image: the sides of non-square
  images are never seen, and crop areas are fractions of the canvas. With ``sizes`` the boxes
  are the reference's, on the whole image (downscaled only past ``max_short_side``).
- Taps at a crop's border may read the pixel just outside its box (torchvision crops first,
  then resizes); values stay float32 between ops (the reference rounds to uint8 after each).
- None in the colour chain: ColorJitter's random order of its four ops is drawn per crop, and
  each op's maths is torchvision's (checked against ``transforms.v2.functional``).

Randomness: every draw is made on the CPU from a CPU ``torch.Generator`` (or the default one)
and moved to the images' device. The masks that pick which crops get an op then live on the
host, so selecting the subsets never waits on the GPU, and one seed gives the same draws on
CPU and CUDA; the cost is a few kilobytes of host-to-device copies per batch.

On CPU, images are processed in chunks of about ``cpu_chunk_elements`` output values: the
chain of ~100 elementwise passes then runs on cached data (16 paper-size images: 70 images/s
as one chunk, 110 in chunks of 1-3 images). Other devices take the batch in one go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dino_core.augment.boxes import RATIO, sample_boxes, sample_boxes_sized  # noqa: F401
from dino_core.augment.canvas import ToCanvas, decode_to_canvas  # noqa: F401
from dino_core.augment.ops import (  # noqa: F401 - part of this module's interface
    JITTER_OPS,
    SOLARIZE_THRESHOLD_FLOAT,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    grayscale,
    solarize,
    to_device,
)
from dino_core.augment.per_image import (
    BLUR_SIGMA,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MULTICROP,
    check_multicrop,
)

JITTER_P, GRAYSCALE_P, FLIP_P = 0.8, 0.2, 0.5
# ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1): factor ranges.
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))


def _grouped(
    x: torch.Tensor, crop_id: torch.Tensor, label: torch.Tensor, fns: Sequence[Callable]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies ``fns[label]`` to each crop, ``label < 0`` meaning none, regrouping the crops.

    Scattering results back in place (``x[idx] = ...``) costs 3-6x a plain copy on CPU, so the
    groups are instead concatenated: the crops come back reordered, and ``crop_id`` tracks
    which crop sits where. Labels live on the CPU, so choosing groups never syncs a GPU.

    Args:
        x: ``(K, 3, S, S)`` crops in the current order.
        crop_id: ``(K,)`` int64 on the CPU: the original index of the crop at each position.
        label: ``(K,)`` int64 on the CPU, indexed by *original* crop index.
        fns: ``fns[l](crops, crop_ids)`` maps ``(k, 3, S, S)`` crops to their new values.

    Returns:
        ``(x, crop_id)`` in the new order.
    """
    at = label[crop_id]
    parts, order = [], []
    for value in at.unique().tolist():
        where = (at == value).nonzero().squeeze(1)
        part = x if len(where) == len(at) else x.index_select(0, to_device(where, x.device))
        parts.append(part if value < 0 else fns[value](part, crop_id[where]))
        order.append(where)
    if len(parts) == 1:
        return parts[0], crop_id
    return torch.cat(parts), crop_id[torch.cat(order)]


class BatchedMultiCrop:
    """DINO's ``2 + n_local`` views of every image in a batch; parameters as
    :class:`dino_core.augment.per_image.MultiCropAugmentation`.

    Args:
        global_size: Side of the two global crops (paper: 224).
        local_size: Side of the local crops (paper: 96).
        n_local: Number of local crops (paper's best: 10).
        global_scale: Area range of global crops, as fractions of the input.
        local_scale: Area range of local crops.
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.
        cpu_chunk_elements: On CPU, output values per chunk (2**20, 4 MiB of float32, was the
            fastest of 2**15-2**30 for both benchmark settings). Other devices process the
            whole batch at once.

    Example:
        >>> aug = BatchedMultiCrop(global_size=32, local_size=16, n_local=2)
        >>> views = aug(torch.zeros(4, 3, 48, 48, dtype=torch.uint8))
        >>> [tuple(v.shape) for v in views]
        [(4, 3, 32, 32), (4, 3, 32, 32), (4, 3, 16, 16), (4, 3, 16, 16)]
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
        cpu_chunk_elements: int = 2**20,
    ) -> None:
        check_multicrop(n_local, global_scale, local_scale)
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = global_scale, local_scale
        self.mean, self.std = tuple(mean), tuple(std)
        self.cpu_chunk_elements = cpu_chunk_elements

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        sizes: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Draws all views of a batch.

        Args:
            images: ``(B, 3, H, W)`` uint8, or float in [0, 1], on any device.
            generator: A CPU generator for every random draw; ``None`` uses torch's default.
            sizes: int64 ``(B, 2)`` on the CPU, or ``None``: image ``b``'s real
                ``(height, width)`` inside a padded batch, its pixels top-left aligned
                (:func:`dino_core.augment.full.pad_batch`); its boxes are then drawn on that
                size. ``None``: every image fills the whole ``H x W`` (a canvas).

        Returns:
            ``[global1, global2, local_1, ..., local_n]``: float32 normalised tensors on the
            images' device, ``(B, 3, global_size, global_size)`` and
            ``(B, 3, local_size, local_size)``. Crop ``b`` of every view comes from image ``b``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("the generator must be a CPU generator (draws are moved to device)")
        b, _, height, width = images.shape
        if sizes is None:  # same boxes, draw for draw, as drawing on H x W directly
            sizes = torch.tensor([[height, width]]).expand(b, 2)
        else:
            sizes = torch.as_tensor(sizes, dtype=torch.int64, device="cpu")
            bad = sizes.shape != (b, 2) or not (
                (sizes >= 1).all() and (sizes <= torch.tensor([height, width])).all()
            )
            if bad:
                raise ValueError(
                    f"sizes must be (B, 2) = ({b}, 2) (height, width) within {height}x{width}"
                )
        # Asymmetric global views (BYOL): view 1 is always blurred and never solarized,
        # view 2 is rarely blurred and sometimes solarized.
        blur_p = torch.tensor([1.0, 0.1]).repeat_interleave(b)
        solarize_p = torch.tensor([0.0, 0.2]).repeat_interleave(b)
        views = self._views(
            images, sizes, 2, self.global_size, self.global_scale, blur_p, solarize_p, generator
        )
        if self.n_local:
            no_solarize = torch.zeros(self.n_local * b)
            views += self._views(
                images,
                sizes,
                self.n_local,
                self.local_size,
                self.local_scale,
                torch.full_like(no_solarize, 0.5),
                no_solarize,
                generator,
            )
        return views

    def _views(self, images, sizes, n_views, size, scale, blur_p, solarize_p, generator):
        """``n_views`` views of one size; per-crop arrays are view-major, ``(n_views * B,)``."""
        b = images.shape[0]
        n = n_views * b
        p = {  # the draw order below is part of the reproducibility contract
            "box": sample_boxes_sized(sizes.repeat(n_views, 1), scale, generator).double(),
            "flip": torch.rand(n, generator=generator) < FLIP_P,
            "jitter": torch.rand(n, generator=generator) < JITTER_P,
            "order": torch.rand(n, 4, generator=generator).argsort(dim=1),
            "factor": torch.rand(n, 4, generator=generator),
            "gray": torch.rand(n, generator=generator) < GRAYSCALE_P,
            "blur": torch.rand(n, generator=generator) < blur_p,
            "sigma": torch.empty(n).uniform_(*BLUR_SIGMA, generator=generator),
            "solarize": torch.rand(n, generator=generator) < solarize_p,
        }
        lo, hi = torch.tensor(JITTER_RANGES).unbind(dim=1)
        p["factor"] = lo + (hi - lo) * p["factor"]
        out = torch.empty(n_views, b, 3, size, size, device=images.device)
        per_image = n_views * 3 * size * size
        step = max(1, self.cpu_chunk_elements // per_image) if images.device.type == "cpu" else b
        for start in range(0, b, step):
            stop = min(start + step, b)
            # this chunk's crops, image-major: crop k = (image start + k // n_views, view k % n)
            crops = (torch.arange(n_views) * b + torch.arange(start, stop).view(-1, 1)).view(-1)
            chunk_p = {key: value[crops] for key, value in p.items()}
            crops_01 = self._crop(images[start:stop], chunk_p, size)
            self._photometric(crops_01, chunk_p, out[:, start:stop])
        return list(out.unbind(0))

    def _crop(self, images: torch.Tensor, p: dict, size: int) -> torch.Tensor:
        """Resamples the boxes of ``(nb, 3, H, W)`` to ``(nb * n_views, 3, size, size)``.

        One ``grid_sample`` per chunk: image ``i``'s views are stacked along the output's
        height, so the input is never copied per crop. Boxes are in pixels of the (padded)
        batch, normalised by its ``H, W``; a box inside a smaller top-left aligned image reads
        the same pixels as in a batch of that image alone.
        """
        nb, _, height, width = images.shape
        x = images.float().div_(255) if not images.is_floating_point() else images.float()
        top, left, h, w = p["box"].unbind(dim=1)
        u = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # output pixel centres
        # align_corners=False maps pixel edges to -1..1: x_norm = 2 * x_pixel / width - 1.
        gy = (2 * (top.view(-1, 1) + u * h.view(-1, 1)) / height - 1).float()
        ux = torch.where(p["flip"].view(-1, 1), 1 - u, u)  # a flip reverses the x taps
        gx = (2 * (left.view(-1, 1) + ux * w.view(-1, 1)) / width - 1).float()
        gy, gx = to_device(gy, x.device), to_device(gx, x.device)
        k = gy.shape[0]
        grid = torch.stack(
            [gx.view(k, 1, size).expand(k, size, size), gy.view(k, size, 1).expand(k, size, size)],
            dim=-1,
        ).view(nb, -1, size, 2)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # (nb, 3, n_views * size, size) -> (nb * n_views, 3, size, size)
        return out.view(nb, 3, -1, size, size).transpose(1, 2).reshape(-1, 3, size, size)

    def _photometric(self, x: torch.Tensor, p: dict, out: torch.Tensor) -> None:
        """Jitter, grayscale, blur, solarize, then normalise into ``out``.

        Args:
            x: ``(nb * n_views, 3, S, S)`` crops in [0, 1], image-major.
            p: Per-crop parameters of these crops, in the same order.
            out: ``(n_views, nb, 3, S, S)`` destination (a strided view is fine).
        """
        crop_id = torch.arange(len(x))
        none = torch.full_like(crop_id, -1)
        for position in range(4):  # ColorJitter applies its ops in a random order per crop
            op = torch.where(p["jitter"], p["order"][:, position], none)
            fns = [
                lambda y, ids, i=i, fn=fn: fn(y, p["factor"][ids, i])
                for i, fn in enumerate(JITTER_OPS)
            ]
            x, crop_id = _grouped(x, crop_id, op, fns)
        to_gray = [lambda y, ids: grayscale(y).expand(-1, 3, -1, -1)]
        x, crop_id = _grouped(x, crop_id, p["gray"].long() - 1, to_gray)
        blur = [lambda y, ids: gaussian_blur(y, p["sigma"][ids])]
        x, crop_id = _grouped(x, crop_id, p["blur"].long() - 1, blur)
        x, crop_id = _grouped(x, crop_id, p["solarize"].long() - 1, [lambda y, ids: solarize(y)])
        if not torch.equal(crop_id, torch.arange(len(x))):
            x = x.index_select(0, to_device(crop_id.argsort(), x.device))
        # (x - mean) / std as one multiply-add, written straight into the output views
        std = to_device(torch.tensor(self.std), x.device).view(1, 3, 1, 1)
        mean = to_device(torch.tensor(self.mean), x.device).view(1, 3, 1, 1)
        views = x.view(-1, out.shape[0], 3, *x.shape[-2:]).transpose(0, 1)
        torch.addcmul(-mean / std, views, 1 / std, out=out)
