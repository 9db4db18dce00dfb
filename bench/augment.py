"""Multi-crop augmentation throughput: per-image pipelines vs. the batched one.

Prints one JSON line per measurement, images/s and crops/s on one CPU core
(``torch.set_num_threads(1)``), for

- ``a_reference_v1_pil``: the reference DINO ``DataAugmentationDINO`` (torchvision v1 on PIL,
  PIL Gaussian blur and solarization, Python ``random``), the baseline of every ratio;
- ``b_multicrop_v2``: :class:`dino_core.augment.MultiCropAugmentation`, per image;
- ``c_batched_cpu``: :class:`dino_core.augment_batched.BatchedMultiCrop` on uint8 batches;
- ``canvas``: :func:`decode_to_canvas` from a decoded non-square image, the per-image CPU
  work the batched path still needs in a DataLoader (not included in ``c``);
- ``c_batched_cuda`` with ``--device cuda``: the batched path on the GPU, input already there
  (images/s of the whole GPU, not per core).

Settings: ``paper`` (2 x 224 + 10 x 96 px crops of 256 px images) and ``small`` (2 x 32 +
4 x 16 of 48 px). Each timing is the best of ``--reps`` repetitions after one warm-up, since
other processes on a shared machine only ever slow a repetition down.

Usage: ``python bench/augment.py [--device cuda] [--quick]`` (about 15 s on one core).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms as T1
from PIL import Image, ImageFilter, ImageOps

from dino_core.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation
from dino_core.augment_batched import BatchedMultiCrop, decode_to_canvas

SETTINGS = {
    # name: (input side, global size, local size, n_local, per-image count, batch size)
    "paper": (256, 224, 96, 10, 12, 32),
    "small": (48, 32, 16, 4, 200, 256),
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


def _best_seconds(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up: allocator, oneDNN primitives, CUDA kernels
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _emit(setting, pipeline, device, images, seconds, n_crops, baseline=None) -> float:
    rate = images / seconds
    record = {
        "setting": setting,
        "pipeline": pipeline,
        "device": device,
        "threads": torch.get_num_threads(),
        "images": images,
        "images_per_s": round(rate, 1),
        "crops_per_s": round(rate * n_crops, 1),
    }
    if baseline is not None:
        record["ratio_to_a"] = round(rate / baseline, 2)
    print(json.dumps(record), flush=True)
    return rate


def run_setting(name: str, reps: int, scale: float, device: str) -> None:
    side, g, loc, n_local, n_img, batch = SETTINGS[name]
    n_img, batch = max(2, int(n_img * scale)), max(2, int(batch * scale))
    n_crops = 2 + n_local
    pil = _images(n_img, side)

    def nothing() -> None:
        return None

    random.seed(0)
    torch.manual_seed(0)
    ref = reference_v1(g, loc, n_local)
    rate_a = _emit(
        name,
        "a_reference_v1_pil",
        "cpu",
        n_img,
        _best_seconds(lambda: [ref(im) for im in pil], reps, nothing),
        n_crops,
    )

    ours = MultiCropAugmentation(g, loc, n_local)
    _emit(
        name,
        "b_multicrop_v2",
        "cpu",
        n_img,
        _best_seconds(lambda: [ours(im) for im in pil], reps, nothing),
        n_crops,
        rate_a,
    )

    batched = BatchedMultiCrop(g, loc, n_local)
    canvas = torch.stack([decode_to_canvas(im, side) for im in _images(batch, side, seed=1)])
    gen = torch.Generator().manual_seed(0)
    _emit(
        name,
        "c_batched_cpu",
        "cpu",
        batch,
        _best_seconds(lambda: batched(canvas, gen), reps, nothing),
        n_crops,
        rate_a,
    )

    wide = _images(n_img, side * 5 // 3, seed=2, height=side * 4 // 3)  # 5:4, decoded
    _emit(
        name,
        "canvas",
        "cpu",
        n_img,
        _best_seconds(lambda: [decode_to_canvas(im, side) for im in wide], reps, nothing),
        1,
    )

    if device == "cuda":
        if not torch.cuda.is_available():
            print(json.dumps({"setting": name, "pipeline": "c_batched_cuda", "skipped": "no CUDA"}))
            return
        n = CUDA_BATCH[name]
        on_gpu = canvas[torch.arange(n) % canvas.shape[0]].to("cuda")
        _emit(
            name,
            "c_batched_cuda",
            torch.cuda.get_device_name(),
            n,
            _best_seconds(lambda: batched(on_gpu, gen), reps, torch.cuda.synchronize),
            n_crops,
            rate_a,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: also time the batched path on the GPU",
    )
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (best is kept)")
    parser.add_argument("--quick", action="store_true", help="quarter the counts (a smoke run)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core figures: a DataLoader worker is one core
    for name in args.settings:
        run_setting(
            name, args.reps if not args.quick else 1, 0.25 if args.quick else 1.0, args.device
        )


if __name__ == "__main__":
    main()
