"""Data-loading throughput of one training worker, the training step left out.

Prints one JSON line per measurement, then a summary line with the ratios and the targets:

- ``local_folder`` (a): a local folder of JPEGs read by the project's loader, the baseline;
- ``s3_per_object`` (b): the same images in S3, one object per image, read per object (the
  path used before packing);
- ``s3_shards`` (c): the same images packed into WebDataset shards in S3
  (``service.data.pack``), read by the streaming reader (``service.data.stream``);
- ``ray_data`` (d): the packed shards read with Ray Data (``service.data.raydata``) on a local
  Ray of 2 CPUs, batches iterated in this process (one consumer = one training worker).

(a)-(c) go through what training calls: ``data.train_dataset(cfg)`` then
``data.train_loader(ds, cfg, ...)``, with ``data.num_workers=2`` (both cores of the CI box)
and the default batched backend: uint8 canvases of 8/7 x ``aug.global_size`` = 256 px,
decoded in the loader workers. Every row reads the same images and delivers the same
canvases, so their rates compare.

How the rows are timed (``bench/fair.py``). At each image count the rows take turns,
``--windows`` rounds, the first row rotating (a b c d, b c d a, ...). A turn builds the row's
reader afresh (dataset and loader, or Ray Data pipeline), takes the first batch (timed:
``first_batch_s``, from constructing the dataset, which lists the prefix for (b) and reads
the manifest for (c), to the first batch out of the loader), then one warm-up batch per
loader process (they start together, so the second batch is nearly done when the first
arrives), then times a window of a fixed number of batches (whole rounds of the loader
processes), and closes the reader. Every row is thus warmed up the same way, and no reader
runs ahead while another row is timed (a reader paused between windows would fill its
queue and flatter its next window). Each row prints, over its turns, the median and spread
([min, max]) of

- ``images_per_sec``: decoded images/s over the timed window;
- ``first_batch_s``;

and ``ratio_to_local_folder`` = its median images/s over (a)'s median at the same count
(``ratio_to_local_folder_spread``: the range of the per-round ratios). The summary's ratios
are those of the medians at the larger count; a first-batch growth is the median at the
larger count over the median at the smaller. When (d) is measured, the local Ray is up
through every row's turns (idle while the others are timed), so all rows share that
background.

The images are generated once into ``--work`` (random sizes 160-500 px per side, smooth
gradients + shapes + noise, JPEG quality 90, about 55 kB each, in 3 class folders,
deterministic from ``--seed``). S3 is moto's server on 127.0.0.1, started and stopped here.
Generation, upload and packing are timed as ``setup`` rows, part of no measurement. moto runs
on the same two cores as the loader: in (b) its per-request CPU stands in for the per-request
latency of real S3. ``--ci`` scales the shards (4 MiB) and the shuffle buffer (64) down with
the image counts, so that, as at full size, a loader process holds more images than its
buffer and each process reads several shards.

Usage:
    python bench/data.py --ci                      # 200 and 600 images, 2-3 minutes
    python bench/data.py --work /tmp/dino-bench    # 2,000 and 20,000 images, JPEGs kept
    python bench/data.py --rows a,c --images 2000,20000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/data.py`
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fair import fields, order, paired_ratios  # noqa: E402
from local_ray import local_ray  # noqa: E402

ROWS = {"a": "local_folder", "b": "s3_per_object", "c": "s3_shards", "d": "ray_data"}
CLASSES = 3
BUCKET = "bench"
TARGETS = {  # name: (what, threshold, higher is better)
    "c_over_a": ("s3_shards images/s >= 0.9 x local_folder", 0.9, True),
    "c_over_b": ("s3_shards images/s >= 5 x s3_per_object", 5.0, True),
    "c_first_batch_growth": ("s3_shards first batch, large / small count <= 1.5", 1.5, False),
}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# -- images -------------------------------------------------------------------------------


def jpeg_bytes(seed: int, index: int) -> bytes:
    """Image ``index`` of the set ``seed``: a smooth colour field, a few flat shapes and
    uniform noise (what makes the JPEG photo-sized), non-square, quality 90."""
    rng = np.random.default_rng((seed, index))
    w, h = (int(x) for x in rng.integers(160, 501, 2))
    low = rng.integers(0, 256, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3),
                       dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    noisy = np.asarray(img, np.int16) + rng.integers(-30, 31, (h, w, 3), dtype=np.int16)
    out = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _image_path(root: Path, index: int) -> Path:
    return root / f"c{index % CLASSES}" / f"{index:06d}.jpg"


def _write_images(job: tuple[str, int, list[int]]) -> None:
    root, seed, indices = job
    for i in indices:
        path = _image_path(Path(root), i)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(jpeg_bytes(seed, i))
        os.replace(tmp, path)  # an interrupted run leaves no half-written JPEG


def generate(pool_dir: Path, n: int, seed: int, processes: int = 2) -> tuple[int, float]:
    """The first ``n`` images of ``seed`` under ``pool_dir`` (missing ones only), in 2
    processes; returns (images written, seconds)."""
    t0 = time.perf_counter()
    for k in range(CLASSES):
        (pool_dir / f"c{k}").mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(n) if not _image_path(pool_dir, i).is_file()]
    if missing:
        chunks = [missing[j::processes * 8] for j in range(processes * 8)]
        # fork: nothing has started a thread yet, and the children need no re-import
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_write_images, [(str(pool_dir), seed, c) for c in chunks if c])
    return len(missing), time.perf_counter() - t0


def subset(pool_dir: Path, dest: Path, n: int) -> Path:
    """A folder of the first ``n`` images of the pool, hard links (no copies)."""
    if (dest / ".complete").is_file():
        return dest
    for i in range(n):
        target = _image_path(dest, i)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(_image_path(pool_dir, i), target)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(_image_path(pool_dir, i), target)
    (dest / ".complete").touch()
    return dest


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.jpg"))


# -- services ------------------------------------------------------------------------------


@contextmanager
def s3_server(log_dir: Path) -> Iterator[str]:
    """moto's S3 server with a bucket; AWS_ENDPOINT_URL and credentials set in os.environ
    (as the tests' fixture does) so fsspec, loader workers and Ray workers all find it."""
    from service.devtools import stack

    service = stack.start_s3(log_dir)
    saved = {k: os.environ.get(k) for k in service.env}
    try:
        os.environ.update(service.env)
        stack.create_bucket(service, BUCKET)
        yield service.endpoint_url
    finally:
        stack.stop(service)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(local: Path, url: str) -> float:
    """Every file under ``local`` to ``url`` (s3fs's put sends them concurrently)."""
    from service.storage import get_fs

    t0 = time.perf_counter()
    fs, path = get_fs(url)
    fs.put(str(local) + "/", path, recursive=True)
    return time.perf_counter() - t0


# -- measurements -------------------------------------------------------------------------


def config(path: str, batch: int, workers: int, global_size: int, shuffle_buffer: int | None):
    from service.config import load_config

    overrides = [f"data.path={path}", f"data.num_workers={workers}",
                 f"train.batch_size={batch}", f"aug.global_size={global_size}"]
    if shuffle_buffer is not None:
        overrides.append(f"data.shuffle_buffer={shuffle_buffer}")
    return load_config(None, None, overrides)


def loader_batches(cfg) -> Iterator[int]:
    """Images per batch of the training loader over ``cfg.data.path`` (dataset built on the
    first ``next``, so time to first batch includes it)."""
    from service import data

    ds = data.train_dataset(cfg)
    loader = data.train_loader(ds, cfg, rank=0, world=1, epoch=0, skip_batches=0,
                               pin_memory=False)
    for images, labels, _ in loader:
        assert images.ndim == 4 and not images.dtype.is_floating_point, images.shape  # canvases
        yield int(labels.numel())


def ray_data_batches(url: str, canvas: int, batch: int, n: int) -> Iterator[int]:
    """Images per batch of Ray Data over the packed prefix ``url``, iterated in this process
    (the decode runs in Ray tasks on the 2 CPUs of the local Ray)."""
    from service.data.raydata import ray_dataset, train_batches

    ds = ray_dataset(url, canvas)
    for images, labels, _ in train_batches(ds, batch, n // batch):
        assert images.ndim == 4 and not images.dtype.is_floating_point, images.shape
        yield int(labels.numel())


def plan_window(n_batches: int, warmup: int, cap: int, workers: int) -> int:
    """Batches per timed window that fit in one epoch of ``n_batches`` after the first batch
    and ``warmup`` more: a whole number of rounds of the loader's processes (each delivers
    its batches in turn and they finish theirs at about the same moment, so a window of one
    batch would time the gap between two batches that were ready together), at most
    ``cap``."""
    w = max(workers, 1)
    left = max(n_batches - 1 - warmup, 1)
    per = min(cap, left) // w * w
    return per if per >= w else left


def turn(batches: Callable[[], Iterator[int]], warmup: int, per: int) -> dict:
    """One turn of a row: a fresh reader, its first batch (timed from constructing the
    dataset), ``warmup`` more, then a timed window of ``per`` batches; the reader is closed
    after. Returns ``first_s``, ``images_per_sec`` and ``batches`` (timed)."""
    t0 = time.perf_counter()
    it = batches()
    try:
        next(it)
        first = time.perf_counter() - t0
        for _ in range(warmup):
            next(it)
        start, images, done = time.perf_counter(), 0, 0
        for count in it:
            images, done = images + count, done + 1
            if done == per:
                break
        if done == 0:
            raise RuntimeError("the epoch ran out before the timed window")
        return {"first_s": first, "images_per_sec": images / (time.perf_counter() - start),
                "batches": done}
    finally:
        it.close()  # the loader's workers stop with their iterator


# -- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ci", action="store_true",
                   help="200 and 600 images, batch 32, 4 MiB shards, packed without Ray "
                   "tasks (2-3 minutes)")
    p.add_argument("--images", default="", help="the two image counts (default 2000,20000)")
    p.add_argument("--work", default="", help="cache dir for the JPEGs (default: a temp dir)")
    p.add_argument("--rows", default="a,b,c,d", help="subset of a,b,c,d")
    p.add_argument("--batch", type=int, default=0, help="images per batch (default 64; ci 32)")
    p.add_argument("--workers", type=int, default=2, help="loader processes (data.num_workers)")
    p.add_argument("--window-batches", type=int, default=0,
                   help="batches per timed window, at most (default 30; ci 5)")
    p.add_argument("--shard-mb", type=float, default=0,
                   help="packed shard size in MiB (default 16; ci 4)")
    p.add_argument("--shuffle-buffer", type=int, default=-1,
                   help="data.shuffle_buffer of packed data (default: the config's; ci 64, "
                   "below the images per loader process, as at full size)")
    p.add_argument("--global-size", type=int, default=224, help="aug.global_size (canvas 8/7x)")
    p.add_argument("--windows", type=int, default=3,
                   help="turns of every row at each count, taken in rotation (median, spread)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    args = p.parse_args(argv)

    counts = sorted(int(x) for x in (args.images or ("200,600" if args.ci else "2000,20000"))
                    .split(","))
    batch = args.batch or (32 if args.ci else 64)
    if args.windows < 1:
        p.error("--windows must be at least 1")
    cap = args.window_batches or (5 if args.ci else 30)
    shard_bytes = int((args.shard_mb or (4 if args.ci else 16)) * 2**20)
    shuffle_buffer = (args.shuffle_buffer if args.shuffle_buffer >= 0
                      else 64 if args.ci else None)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"--rows: unknown {', '.join(sorted(unknown))}; choose from a,b,c,d")
    rows = [ROWS[k] for k in ROWS if k in args.rows.split(",")]
    warmup = max(args.workers, 1)
    canvas = round(args.global_size * 8 / 7)
    import torch

    from service import data  # noqa: F401 - imported before anything is timed
    from service.config import load_config

    emit({"bench": "data", "kind": "config", "images": counts, "batch": batch,
          "workers": args.workers, "canvas": canvas, "rows": rows, "cpus": os.cpu_count(),
          "window_batches": cap, "windows": args.windows, "warmup_batches": warmup,
          "shard_bytes": shard_bytes, "torch": torch.__version__,
          "shuffle_buffer": load_config().data.shuffle_buffer if shuffle_buffer is None
          else shuffle_buffer})

    results: dict[tuple[str, int], dict] = {}
    failed = False
    with ExitStack() as stack:
        if args.work:
            work = Path(args.work).absolute()
        else:
            work = Path(tempfile.mkdtemp(prefix="dino-bench-data-"))
            stack.callback(shutil.rmtree, work, True)
        pool = work / f"pool-seed{args.seed}"
        written, seconds = generate(pool, max(counts), args.seed)
        folders = {n: subset(pool, work / f"seed{args.seed}-n{n}", n) for n in counts}
        emit({"bench": "data", "kind": "setup", "step": "generate", "images": max(counts),
              "written": written, "seconds": round(seconds, 1),
              "images_per_sec": round(written / seconds, 1) if written else None,
              "mean_kb": round(folder_bytes(folders[max(counts)]) / max(counts) / 1e3, 1)})

        needs_s3 = any(r != "local_folder" for r in rows)
        if needs_s3:
            stack.enter_context(s3_server(work / "logs"))
        objects = {n: f"s3://{BUCKET}/objects/n{n}" for n in counts}
        packed = {n: f"s3://{BUCKET}/packed/n{n}" for n in counts}
        if "s3_per_object" in rows:
            for n in counts:
                sec = upload(folders[n], objects[n])
                emit({"bench": "data", "kind": "setup", "step": "upload", "images": n,
                      "seconds": round(sec, 1), "images_per_sec": round(n / sec, 1)})

        def cfg(path: str):
            return config(path, batch, args.workers, args.global_size, shuffle_buffer)

        def readers(n: int) -> dict[str, Callable[[], Iterator[int]]]:
            sources = {"local_folder": lambda: loader_batches(cfg(str(folders[n]))),
                       "s3_per_object": lambda: loader_batches(cfg(objects[n])),
                       "s3_shards": lambda: loader_batches(cfg(packed[n])),
                       "ray_data": lambda: ray_data_batches(packed[n], canvas, batch, n)}
            return {row: sources[row] for row in rows}

        if {"s3_shards", "ray_data"} & set(rows):
            if "ray_data" in rows or not args.ci:  # packs in Ray tasks; (d) reads through it
                stack.enter_context(local_ray(2, include_dashboard=False, log_to_driver=False))
            for n in counts:
                try:
                    from service.data.pack import pack

                    # setup, not measured: at --ci counts Ray tasks cost more than they save
                    result = pack(str(folders[n]), packed[n], shard_bytes=shard_bytes,
                                  parallel=not args.ci)
                    emit({"bench": "data", "kind": "setup", "step": "pack", "images": n,
                          "source": "local folder", "shards": len(result.manifest.shards),
                          "parallel": not args.ci,
                          "seconds": round(result.seconds, 1),
                          "images_per_sec": round(n / result.seconds, 1)})
                except Exception as err:
                    failed = True
                    emit({"bench": "data", "kind": "setup", "step": "pack", "images": n,
                          "error": repr(err)[:500]})
            if "ray_data" in rows:
                with contextlib.suppress(ImportError):  # else the row reports it
                    import service.data.raydata  # noqa: F401 - not timed
            else:  # nothing reads through Ray: the rows run without it, as training would
                import ray

                if ray.is_initialized():
                    ray.shutdown()

        for n in counts:
            per = plan_window(n // batch, warmup, cap, args.workers)
            turns: dict[str, list[dict]] = {row: [] for row in rows}
            errors: dict[str, str] = {}
            sources = readers(n)
            for r in range(args.windows):
                for row in order(rows, r):
                    if row in errors:
                        continue
                    try:
                        turns[row].append(turn(sources[row], warmup, per))
                    except Exception as err:  # a broken reader is a failed row, not a gap
                        errors[row] = repr(err)[:500]
            base = [t["images_per_sec"] for t in turns.get("local_folder", [])]
            for row in rows:
                if row in errors:
                    failed = True
                    emit({"bench": "data", "row": row, "images": n, "error": errors[row]})
                    continue
                ips = [t["images_per_sec"] for t in turns[row]]
                got = {**fields("images_per_sec", ips, 1),
                       **fields("first_batch_s", [t["first_s"] for t in turns[row]]),
                       "windows": len(ips), "batches_per_window": per,
                       "timed_batches": sum(t["batches"] for t in turns[row])}
                results[(row, n)] = got
                pairs = paired_ratios(ips, base) if base else None
                emit({"bench": "data", "row": row, "images": n, "batch": batch,
                      "workers": args.workers, "canvas": canvas, **got,
                      "ratio_to_local_folder": round(statistics.median(ips)
                                                     / statistics.median(base), 2)
                      if base else None,
                      "ratio_to_local_folder_spread": [round(min(pairs), 2),
                                                       round(max(pairs), 2)]
                      if pairs else None})

    summary = summarize(results, rows, counts)
    emit(summary)
    return 1 if failed else 0


def summarize(results: dict[tuple[str, int], dict], rows: list[str], counts: list[int]) -> dict:
    """Ratios at the largest count and the targets, each with pass/fail (None: not measured)."""
    small, large = counts[0], counts[-1]

    def ips(row: str) -> float | None:
        r = results.get((row, large))
        return r and r["images_per_sec"]

    def growth(row: str) -> float | None:
        a, b = results.get((row, small)), results.get((row, large))
        return a and b and round(b["first_batch_s"] / a["first_batch_s"], 2)

    def ratio(top: str, bottom: str) -> float | None:
        x, y = ips(top), ips(bottom)
        return x and y and round(x / y, 2)

    values = {"c_over_a": ratio("s3_shards", "local_folder"),
              "c_over_b": ratio("s3_shards", "s3_per_object"),
              "c_first_batch_growth": growth("s3_shards")}
    targets = {}
    for name, (what, threshold, higher) in TARGETS.items():
        v = values[name]
        ok = None if v is None else (v >= threshold if higher else v <= threshold)
        targets[name] = {"target": what, "value": v, "pass": ok}
    return {"bench": "data", "kind": "summary", "images": large,
            "images_per_sec": {row: ips(row) for row in rows},
            "first_batch_growth": {row: growth(row) for row in rows},
            "ratios_to_local_folder": {row: ratio(row, "local_folder") for row in rows},
            "targets": targets,
            "all_pass": all(t["pass"] for t in targets.values())}


if __name__ == "__main__":
    sys.exit(main())
