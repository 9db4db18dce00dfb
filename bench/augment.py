"""Multi-crop augmentation throughput: per-image pipelines vs. the batched one.

Every CPU pipeline starts from the same decoded images (PIL, non-square 5:4, as a loader
worker holds them after ``Image.open``) and ends with the normalised float crops, so each
does the whole per-image work of a DataLoader worker after decoding:

- ``a_reference_v1_pil``: the reference DINO ``DataAugmentationDINO`` (torchvision v1 on PIL,
  PIL Gaussian blur and solarization, Python ``random``), the baseline of every ratio;
- ``b_multicrop_v2``: :class:`dino_core.augment.per_image.MultiCropAugmentation`, per image;
- ``c_batched_cpu``: :func:`decode_to_canvas` of each image (resize and centre crop to a
  square uint8 canvas, ``pil_to_tensor``), stacked, then
  :class:`dino_core.augment.batched.BatchedMultiCrop` on the batch: the canvases are made
  inside the timing;
- ``canvas``: :func:`decode_to_canvas` alone, the part of ``c`` a loader worker does before
  collating (no ratio: it makes no crops);
- ``c_batched_cuda`` with ``--device cuda``: the batched path on the GPU, canvases already
  there (images/s of the whole GPU, not per core; no ratio: the canvases come from the
  loader workers and the device is another machine part).

One JSON line per pipeline: images/s and crops/s on one CPU core (``torch.set_num_threads(1)``)
as the median over ``--reps`` timed repetitions with the spread (``*_spread`` = [min, max]),
and ``ratio_to_a`` = median images/s over ``a``'s median (``ratio_to_a_spread``: the range
of the per-repetition ratios). The pipelines take turns (``bench/fair.py``: each repetition
runs all of them, the first one rotating), after one untimed repetition each, so a busy
moment of a shared machine slows every pipeline alike.

Settings: ``paper`` (2 x 224 + 10 x 96 px crops; 426 x 341 px images, 256 px canvases) and
``small`` (2 x 32 + 4 x 16; 80 x 64 px images, 48 px canvases).

Usage: ``python bench/augment.py [--device cuda] [--quick]`` (about a minute on one core;
``--quick``: a quarter of the images, 3 repetitions).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms as T1
from PIL import Image, ImageFilter, ImageOps

from dino_core.augment.batched import BatchedMultiCrop, decode_to_canvas
from dino_core.augment.per_image import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fair import alternate, fields, paired_ratios, rates  # noqa: E402

SETTINGS = {
    # name: (canvas side, global size, local size, n_local, images, batch size of c)
    "paper": (256, 224, 96, 10, 32, 32),
    "small": (48, 32, 16, 4, 256, 256),
}
CUDA_BATCH = {"paper": 256, "small": 1024}


class _PILBlur:
    """The reference's ``utils.GaussianBlur``: PIL blur, radius ~ U(0.1, 2.0), with prob ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _PILSolarize:
    """The reference's ``utils.Solarization``: ``ImageOps.solarize`` (threshold 128)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def reference_v1(global_size: int, local_size: int, n_local: int) -> Callable:
    """The reference DINO ``DataAugmentationDINO`` with the paper's scales, as a function."""
    flip_jitter_gray = T1.Compose(
        [
            T1.RandomHorizontalFlip(p=0.5),
            T1.RandomApply([T1.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T1.RandomGrayscale(p=0.2),
        ]
    )
    normalize = T1.Compose([T1.ToTensor(), T1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    bicubic = T1.InterpolationMode.BICUBIC

    def view(size, scale, blur_p, solarize_p=0.0):
        ops = [T1.RandomResizedCrop(size, scale=scale, interpolation=bicubic), flip_jitter_gray]
        ops += [_PILBlur(blur_p)] + ([_PILSolarize(solarize_p)] if solarize_p else [])
        return T1.Compose(ops + [normalize])

    global1 = view(global_size, (0.4, 1.0), 1.0)
    global2 = view(global_size, (0.4, 1.0), 0.1, 0.2)
    local = view(local_size, (0.05, 0.4), 0.5)
    return lambda img: [global1(img), global2(img)] + [local(img) for _ in range(n_local)]


def _images(n: int, side: int, seed: int = 0, height: int | None = None) -> list[Image.Image]:
    """Smooth random colour fields plus noise: photo-like content (timings barely depend on it)."""
    rng = np.random.default_rng(seed)
    size = (side, height or side)
    out = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size)
        pixels = np.asarray(coarse, np.float32) + rng.normal(0, 12, (size[1], size[0], 3))
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


def _seconds(fn: Callable[[], object], sync: Callable[[], None]) -> Callable[[], float]:
    """``fn`` as one timed repetition (seconds)."""

    def timed() -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return timed


def _emit(setting, pipeline, device, images, seconds, n_crops, baseline=None) -> None:
    """One line: images/s (median, spread) of ``seconds`` for ``images`` images, with the
    ratio to ``baseline``'s images/s of the same repetitions when given."""
    ips = rates(images, seconds)
    record = {
        "setting": setting,
        "pipeline": pipeline,
        "device": device,
        "threads": torch.get_num_threads(),
        "images": images,
        "reps": len(seconds),
        **fields("images_per_s", ips, 1),
        **fields("crops_per_s", [x * n_crops for x in ips], 1),
    }
    if baseline is not None:
        record["ratio_to_a"] = round(statistics.median(ips) / statistics.median(baseline), 2)
        pairs = paired_ratios(ips, baseline)
        record["ratio_to_a_spread"] = [round(min(pairs), 2), round(max(pairs), 2)]
    print(json.dumps(record), flush=True)


def run_setting(name: str, reps: int, scale: float, device: str) -> None:
    side, g, loc, n_local, n_img, batch = SETTINGS[name]
    batch = max(2, int(batch * scale))
    n_img = max(batch, int(n_img * scale)) // batch * batch  # whole batches for c
    n_crops = 2 + n_local
    # the same decoded images for every pipeline: 5:4, larger than the canvas
    images = _images(n_img, side * 5 // 3, seed=0, height=side * 4 // 3)

    def nothing() -> None:
        return None

    random.seed(0)
    torch.manual_seed(0)
    ref = reference_v1(g, loc, n_local)
    ours = MultiCropAugmentation(g, loc, n_local)
    batched = BatchedMultiCrop(g, loc, n_local)
    gen = torch.Generator().manual_seed(0)

    def c_batched() -> None:
        for i in range(0, n_img, batch):
            canvases = torch.stack([decode_to_canvas(im, side) for im in images[i:i + batch]])
            batched(canvases, gen)

    seconds = alternate({
        "a_reference_v1_pil": _seconds(lambda: [ref(im) for im in images], nothing),
        "b_multicrop_v2": _seconds(lambda: [ours(im) for im in images], nothing),
        "c_batched_cpu": _seconds(c_batched, nothing),
        "canvas": _seconds(lambda: [decode_to_canvas(im, side) for im in images], nothing),
    }, reps, warmup=1)  # warm-up: allocator, oneDNN primitives
    base = rates(n_img, seconds["a_reference_v1_pil"])
    _emit(name, "a_reference_v1_pil", "cpu", n_img, seconds["a_reference_v1_pil"], n_crops,
          base)
    _emit(name, "b_multicrop_v2", "cpu", n_img, seconds["b_multicrop_v2"], n_crops, base)
    _emit(name, "c_batched_cpu", "cpu", n_img, seconds["c_batched_cpu"], n_crops, base)
    _emit(name, "canvas", "cpu", n_img, seconds["canvas"], 1)

    if device == "cuda":
        if not torch.cuda.is_available():
            print(json.dumps({"setting": name, "pipeline": "c_batched_cuda", "skipped": "no CUDA"}))
            return
        n = CUDA_BATCH[name]
        canvases = torch.stack([decode_to_canvas(im, side) for im in images])
        on_gpu = canvases[torch.arange(n) % canvases.shape[0]].to("cuda")
        timed = _seconds(lambda: batched(on_gpu, gen), torch.cuda.synchronize)
        cuda_seconds = alternate({"c": timed}, reps, warmup=1)["c"]
        _emit(name, "c_batched_cuda", torch.cuda.get_device_name(), n, cuda_seconds, n_crops)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: also time the batched path on the GPU",
    )
    parser.add_argument("--reps", type=int, default=5,
                        help="timed repetitions per pipeline, taken in turns (median, spread)")
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the images, 3 repetitions (a smoke run)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # per-core figures: a DataLoader worker is one core
    for name in args.settings:
        run_setting(
            name, args.reps if not args.quick else 3, 0.25 if args.quick else 1.0, args.device
        )


if __name__ == "__main__":
    main()
