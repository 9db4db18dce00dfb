"""``dino data pack SRC DEST``: an image folder or URL packed into WebDataset shards
(``service.data.shards``), one Ray task per shard.

Every image is decoded once at pack time; unreadable ones, and files whose names are not
UTF-8 (``service.data.remote.list_source``), are left out and listed, with the reason, in
``pack-report.json``. Shards are planned from the sorted listing (contiguous runs of about
``shard_bytes``), so a re-run plans the same shards: each finished shard leaves a
marker under ``DEST/.pack/``, a re-run packs only the shards without one, and the manifest is
written when all are there. A source that changed since the first run is refused (its
listing's fingerprint is in ``DEST/.pack/plan.json``). Ctrl-C ends a pack with
``PackInterrupted``, which says how far it got; the same command resumes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from dino_core.data.folder import load_rgb
from service.config.sources import absolute
from service.data.remote import Listing, list_source
from service.data.shards import (
    REPORT,
    Manifest,
    Sample,
    ShardInfo,
    read_if_there,
    sample_key,
    sha256_of,
    shard_name,
    write_manifest,
    write_shard,
)
from service.errors import DataError
from service.storage import get_fs, is_local, join, upload_file, with_retries

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 * 2**20
STATE_DIR = ".pack"
EXTENSIONS = {"jpeg": "jpg", "tif": "tiff"}
PROGRESS_SECONDS = 5.0


@dataclass(frozen=True)
class ShardJob:
    index: int
    src: str
    dest: str
    first: int  # global index of the job's first image
    paths: list[str]
    labels: list[int]
    labeled: bool


@dataclass(frozen=True)
class PackResult:
    manifest: Manifest
    packed_now: int  # shards packed by this run (the others were done before)
    skipped: list[dict]  # every file left out, ``bad_names`` included
    seconds: float
    bad_names: int = 0  # of ``skipped``: names that are not UTF-8


class PackInterrupted(KeyboardInterrupt):
    """Ctrl-C during a pack, saying what was written by then; the same command resumes."""


def plan(sizes: list[int], shard_bytes: int) -> list[range]:
    """Contiguous runs of images of at most ``shard_bytes`` each (at least one image)."""
    runs, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > shard_bytes:
            runs.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def fingerprint(listing: Listing, shard_bytes: int) -> str:
    h = hashlib.sha256(str(shard_bytes).encode())
    for path, size, label in zip(listing.paths, listing.sizes, listing.labels):
        # surrogateescape: a source folder whose own path is not UTF-8 hashes too
        h.update(f"{path}\0{size}\0{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _extension(path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower()
    return EXTENSIONS.get(ext, ext)


def _put(local: str, url: str) -> None:
    if is_local(url):
        target = url.removeprefix("file://")
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        shutil.copyfile(local, target + ".part")
        os.replace(target + ".part", target)  # never a half-written shard under its name
    else:
        upload_file(local, url)


def _write_json(url: str, doc: dict) -> None:
    fs, path = get_fs(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with_retries(lambda: fs.pipe_file(path, json.dumps(doc, indent=1).encode()),
                 f"write of {url}", url=url)


def pack_shard(job: ShardJob) -> dict:
    """Reads, checks and writes the images of one shard; returns its marker."""
    fs = None if is_local(job.src) else get_fs(job.src)[0]
    skipped: list[dict] = []

    def samples():
        for offset, (path, label) in enumerate(zip(job.paths, job.labels)):
            try:
                if fs is None:
                    with open(path, "rb") as f:
                        raw = f.read()
                else:
                    raw = with_retries(lambda p=path: fs.cat_file(p), f"read of {path}",
                                       url=job.src)
                load_rgb(io.BytesIO(raw))  # a full decode: what training will do
            except Exception as exc:  # decoders raise many types
                skipped.append({"path": path, "error": f"{type(exc).__name__}: {exc}"})
                continue
            yield Sample(sample_key(job.first + offset), _extension(path), raw, label)

    with tempfile.TemporaryDirectory(prefix="dino-pack-") as d:
        local = os.path.join(d, shard_name(job.index))
        with open(local, "wb") as out:
            count = write_shard(out, samples(), job.labeled)
        with open(local, "rb") as f:
            digest = sha256_of(f)
        if count:
            _put(local, join(job.dest, shard_name(job.index)))
        marker = {"name": shard_name(job.index), "num_images": count,
                  "bytes": os.path.getsize(local), "sha256": digest, "skipped": skipped}
    _write_json(join(job.dest, STATE_DIR, shard_name(job.index) + ".json"), marker)
    return marker


def _done_markers(dest: str, count: int) -> dict[int, dict]:
    """The markers of the shards packed before: one listing and one batched read (s3fs reads
    many objects concurrently), not a request pair per shard."""
    url = join(dest, STATE_DIR)
    fs, path = get_fs(url)
    found = with_retries(lambda: fs.find(path), f"listing of {url}", url=url)
    names = {shard_name(i) + ".json": i for i in range(count)}
    wanted = [p for p in found if p.rsplit("/", 1)[-1] in names]
    if not wanted:
        return {}
    blobs = with_retries(lambda: fs.cat(wanted), f"read of the markers under {url}", url=url)
    return {names[p.rsplit("/", 1)[-1]]: json.loads(blob) for p, blob in blobs.items()}


def _read_json(url: str) -> dict | None:
    raw = read_if_there(url)
    return None if raw is None else json.loads(raw)


def pack(src: str, dest: str, shard_bytes: int = DEFAULT_SHARD_BYTES, *, parallel: bool = True,
         progress: Callable[[str], None] | None = None,
         num_cpus: int | None = None) -> PackResult:
    """Packs the images under ``src`` into shards under ``dest``; see the module docstring.

    ``parallel``: one Ray task per shard, on the Ray this process is connected to, else on a
    local one of ``num_cpus``; False packs in this process (tests, tiny sets). ``progress``
    gets a line every few seconds.

    Raises:
        DataError: no images under ``src``, ``src`` is a file, or ``src`` changed since an
            unfinished earlier pack into ``dest``.
        PackInterrupted: Ctrl-C while shards were being packed (a re-run resumes).
    """
    started = time.time()
    src, dest = absolute(src), absolute(dest).rstrip("/")  # Ray tasks run elsewhere
    say = progress or (lambda message: None)
    listing = list_source(src)
    runs = plan(listing.sizes, shard_bytes)
    stamp = fingerprint(listing, shard_bytes)
    plan_url = join(dest, STATE_DIR, "plan.json")
    earlier = _read_json(plan_url)
    if earlier is not None and earlier.get("fingerprint") != stamp:
        raise DataError(f"{src} changed since an earlier pack into {dest} (different files, "
                        "sizes or --shard-mb): pack into a new DEST, or delete this one")
    if earlier is None:
        _write_json(plan_url, {"fingerprint": stamp, "shards": len(runs), "source": src})
    markers = _done_markers(dest, len(runs))
    labeled = bool(listing.classes)
    jobs = [ShardJob(i, src, dest, r.start, listing.paths[r.start:r.stop],
                     listing.labels[r.start:r.stop], labeled)
            for i, r in enumerate(runs) if i not in markers]
    if markers:
        say(f"[dino] {len(markers)} of {len(runs)} shards were packed before; packing the "
            f"other {len(jobs)}")
    try:
        _pack_shards(jobs, markers, len(runs), parallel, num_cpus, say)
    except KeyboardInterrupt:
        raise PackInterrupted(_interrupted(markers, len(runs), dest, parallel)) from None
    ordered = [markers[i] for i in range(len(runs))]
    skipped_files = listing.bad_names + [s for m in ordered for s in m["skipped"]]
    _write_json(join(dest, REPORT), {"source": src, "skipped": skipped_files})
    manifest = Manifest(dest, tuple(listing.classes),
                        tuple(ShardInfo(m["name"], m["num_images"], m["bytes"], m["sha256"])
                              for m in ordered if m["num_images"]),
                        source=src, skipped=len(skipped_files))
    if not manifest.num_images:
        raise DataError(f"none of the {len(skipped_files)} files under {src} could be read "
                        f"(the reasons are in {join(dest, REPORT)})")
    write_manifest(manifest)
    return PackResult(manifest, len(jobs), skipped_files, time.time() - started,
                      len(listing.bad_names))


def _pack_shards(jobs: list[ShardJob], markers: dict[int, dict], total: int, parallel: bool,
                 num_cpus: int | None, say: Callable[[str], None]) -> None:
    """Packs ``jobs``, adding each marker to ``markers`` as its shard is written (so what
    was written is known when Ctrl-C ends this early); a progress line every few seconds."""
    said = 0.0
    for i, marker in _run(jobs, parallel, num_cpus):
        markers[i] = marker
        if time.time() - said > PROGRESS_SECONDS or len(markers) == total:
            said = time.time()
            images = sum(m["num_images"] for m in markers.values())
            skipped = sum(len(m["skipped"]) for m in markers.values())
            say(f"[dino] packed {len(markers)}/{total} shards: {images} images, "
                f"{skipped} unreadable skipped")


def _interrupted(markers: dict[int, dict], total: int, dest: str, parallel: bool) -> str:
    """The one line for Ctrl-C (a shard cut short has no marker and is packed again). Ray
    tasks already running finish their shards while Ray shuts down: "at least"."""
    if not markers:
        return (f"interrupted as the packing of {total} shards into {dest} began; rerun the "
                "same command to pack")
    images = sum(m["num_images"] for m in markers.values())
    least = "at least " if parallel else ""
    return (f"interrupted: {least}{len(markers)} of {total} shards ({images} images) are "
            f"written under {dest}; rerun the same command to pack the rest and write the "
            "manifest")


def _run(jobs: list[ShardJob], parallel: bool, num_cpus: int | None):
    """``(index, marker)`` of each job as it finishes."""
    if not parallel or len(jobs) <= 1:
        for job in jobs:
            yield job.index, pack_shard(job)
        return
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
    task = ray.remote(num_cpus=1, max_retries=3)(pack_shard)
    pending = {task.remote(job): job.index for job in jobs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            yield pending.pop(ref), ray.get(ref)
