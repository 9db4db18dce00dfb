"""Object storage through fsspec: local paths, s3:// (s3fs, honours AWS_ENDPOINT_URL and the
usual AWS variables), gs:// (gcsfs). Every remote call is retried through outages
(``service.storage.retry``); a failed upload keeps its local copy and names it."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs

from service.errors import StorageError
from service.storage.retry import spool_dir, with_retries

log = logging.getLogger(__name__)
BUCKET_SCHEMES = ("s3", "gs", "gcs")  # object stores whose first path part is a bucket
PROBE = ".dino-write-probe"  # made and deleted under a storage root to see that it is writable


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it (``s3://b/k`` -> (S3FileSystem, 'b/k'))."""
    if url.startswith("s3://"):
        # s3fs caches listings per instance; a fresh one sees what other processes wrote
        return url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)
    return url_to_fs(url)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def with_scheme(path: str, like: str) -> str:
    """``bucket/key`` -> ``s3://bucket/key`` when ``like`` is an s3:// URL (Ray reports
    checkpoint paths inside the filesystem, without the scheme)."""
    if "://" in path or "://" not in like:
        return path
    return like.split("://", 1)[0] + "://" + path.lstrip("/")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def upload_file(local_path: str | Path, url: str) -> None:
    """Copies a local file to ``url``, retried through an outage; if storage does not come
    back, a copy is kept under ``<spool>/kept/<its storage path>`` and the StorageError names
    it (the caller's file may be in a temporary directory)."""
    fs, path = get_fs(url)
    try:
        with_retries(lambda: fs.put_file(str(local_path), path), f"upload of {local_path}",
                     url=url)
    except StorageError as err:
        kept = spool_dir() / "kept" / path.lstrip("/")
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, kept)
        log.error("upload of %s failed; the local copy is kept at %s", url, kept)
        raise StorageError(f"{err}; the local copy is kept at {kept}") from err


def upload_dir(local_dir: str | Path, url: str, attempts: int | None = None,
               base_delay: float = 1.0) -> None:
    """Copies a local directory to ``url`` (retried); the local directory is left in place."""
    fs, path = get_fs(url)

    def put() -> None:
        fs.put(str(local_dir).rstrip("/") + "/", path, recursive=True)

    with_retries(put, f"upload of {local_dir} to {url}", attempts, base_delay, url)


def download_dir(url: str, local_dir: str | Path | None = None) -> Path:
    """Copies ``url`` (a directory) to a local directory and returns it."""
    if is_local(url):
        return Path(url.removeprefix("file://"))
    target = Path(local_dir or tempfile.mkdtemp(prefix="dino-dl-"))
    fs, path = get_fs(url)

    def get() -> None:
        fs.get(path.rstrip("/") + "/", str(target).rstrip("/") + "/", recursive=True)

    with_retries(get, f"download of {url}", url=url)
    return target


def download_file(url: str, local_path: str | Path) -> Path:
    if is_local(url):
        shutil.copyfile(url.removeprefix("file://"), local_path)
    else:
        fs, path = get_fs(url)
        with_retries(lambda: fs.get(path, str(local_path)), f"download of {url}", url=url)
    return Path(local_path)


def read_bytes(url: str, fs: Any = None) -> bytes:
    """The bytes of a local file or of an object, retried through an outage.

    ``fs``: the URL's filesystem when the caller already holds one (a decode task reading
    a batch of images keeps one client, instead of a fresh one per image).

    Raises:
        OSError: a local file that cannot be read.
        StorageError: an object that cannot be read (not found, no access: at once).
    """
    if is_local(url):
        with open(url.removeprefix("file://"), "rb") as f:
            return f.read()
    if fs is None:
        fs, path = get_fs(url)
    else:
        path = fs._strip_protocol(url)
    return with_retries(lambda: fs.cat_file(path), f"read of {url}", url=url)


def write_bytes(url: str, data: bytes) -> None:
    """Writes a whole file (in place: a user's ``--out /dev/stdout`` or symlink stays what it
    is; its folder must exist) or an object, in one request, retried through an outage.
    ``replace_file`` is the local write that a reader never sees half done."""
    if is_local(url):
        with open(url.removeprefix("file://"), "wb") as f:
            f.write(data)
        return
    fs, path = get_fs(url)
    with_retries(lambda: fs.pipe_file(path, data), f"write of {url}", url=url)


def replace_file(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` to a temporary name beside the local ``path``, synced, then renamed
    over it (atomic on one filesystem): a reader sees the old file or the new, whole."""
    path = str(path).removeprefix("file://")
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_dirs(url: str) -> list[str]:
    """Immediate sub-directories of ``url`` as full URLs, sorted; [] if it does not exist."""
    fs, path = get_fs(url)
    if not fs.exists(path):
        return []
    prefix = url.split("://", 1)[0] + "://" if "://" in url else ""
    entries = fs.ls(path, detail=True)
    return sorted(prefix + e["name"] for e in entries if e["type"] == "directory")


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(url.removeprefix("file://"), exist_ok=True)


def check_bucket(url: str, create: bool = False) -> None:
    """The bucket of an ``s3://`` or ``gs://`` URL exists, or is made when ``create``.

    s3fs makes a missing bucket on the first write under it (Ray's first mkdir), so a
    misspelt bucket name would silently train into a new bucket. A bucket that answers
    "access denied" may exist: the write probe (``check_writable``) judges it.
    """
    if is_local(url) or url.split("://", 1)[0].lower() not in BUCKET_SCHEMES:
        return
    fs, path = get_fs(url)
    bucket = path.split("/", 1)[0]
    try:
        with_retries(lambda: fs.info(bucket), f"look-up of bucket {bucket!r}", url=url)
        return
    except StorageError as err:
        if isinstance(err.__cause__, PermissionError):
            return
        if not isinstance(err.__cause__, FileNotFoundError):
            raise
    if not create:
        raise StorageError(
            f"storage.root={url}: bucket {bucket!r} does not exist; create it (or correct "
            "the name), or set storage.create_bucket=true to have it made")
    log.warning("storage.root=%s: making the bucket %r (storage.create_bucket=true)", url, bucket)
    with_retries(lambda: fs.mkdir(bucket), f"creation of bucket {bucket!r}", url=url)


def check_writable(url: str) -> None:
    """``url`` is a folder (or prefix) this process can write into: a probe file is made
    and deleted there. A root that is a file, or on a read-only mount, otherwise failed at the
    first write (the run lock, Ray's first mkdir) in a traceback."""
    probe = f"{PROBE}-{secrets.token_hex(4)}"
    if is_local(url):
        _check_local_folder(url, probe)
        return
    fs, path = get_fs(url)
    target = f"{path.rstrip('/')}/{probe}"  # an object store has no folders to be files
    try:
        with_retries(lambda: fs.pipe_file(target, b""), f"write of {probe}", url=url)
        with_retries(lambda: fs.rm_file(target), f"delete of {probe}", url=url)
    except StorageError as err:
        if isinstance(err.__cause__, PermissionError):
            raise StorageError(f"storage.root={url} is not writable by these credentials "
                               f"(a test object could not be written and deleted: "
                               f"{err.__cause__})") from None
        raise


def _check_local_folder(url: str, probe: str) -> None:
    """The local ``url`` is a folder, made if missing, where a file can be made and deleted."""
    root = Path(url.removeprefix("file://"))
    try:
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not existing.is_dir():
            raise StorageError(f"storage.root={url}: {existing} is a file, not a folder; give "
                               "a folder (it is made if missing)")
        root.mkdir(parents=True, exist_ok=True)
        (root / probe).write_bytes(b"")
        (root / probe).unlink()
    except OSError as err:
        raise StorageError(f"storage.root={url} is not writable: {err.strerror or err} "
                           f"({err.filename}); give a folder this user can write to "
                           "(a read-only mount cannot hold checkpoints)") from None
