"""Object storage through fsspec: local paths, s3:// (s3fs, honours AWS_ENDPOINT_URL and the
usual AWS variables), gs:// (gcsfs).

Storage outages are waited out: calls are retried with exponential backoff until the storage has
been unreachable for ``DINO_STORAGE_RETRY_SECONDS`` (default 300 s), then fail with a
``StorageError`` naming the storage URL. Ray Train writes checkpoints through
``RetryingFSHandler``: each file goes to a local spool first, so a retry can resend it, and a
file that never got through stays on local disk (``DINO_STORAGE_SPOOL_DIR``, default
``<tmp>/dino-spool``, under ``kept/<its storage path>``); the error names that copy.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import fsspec
import pyarrow
import pyarrow.fs
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS_ENV = "DINO_STORAGE_RETRY_SECONDS"
SPOOL_DIR_ENV = "DINO_STORAGE_SPOOL_DIR"
# long enough to ride out a storage restart or a short network partition; training waits at
# the checkpoint meanwhile, which costs less than losing the work since the last one
DEFAULT_RETRY_SECONDS = 300.0
MAX_DELAY = 30.0
# answers, not outages: retrying them only delays the same error
PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
             PermissionError, ValueError, TypeError, KeyError)
PERMANENT_NAMES = {"NoCredentialsError", "ParamValidationError"}  # botocore, not imported here
RAY_MARKER = "/.validate_storage_marker"  # Ray Train checks it before each checkpoint upload


class StorageError(RuntimeError):
    """Storage stayed unreachable through every retry, or refused (not found, no access)."""


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


def retry_seconds() -> float:
    """How long storage may stay unreachable before a call gives up (``DINO_STORAGE_RETRY_SECONDS``)."""
    return float(os.environ.get(RETRY_SECONDS_ENV) or DEFAULT_RETRY_SECONDS)


def spool_dir() -> Path:
    """Where writes wait for their upload, and stay if it never succeeds."""
    return Path(os.environ.get(SPOOL_DIR_ENV) or Path(tempfile.gettempdir(), "dino-spool"))


def is_transient(err: BaseException) -> bool:
    """Connection refused or reset, timeouts, 5xx: worth retrying. Not-found and the like are not."""
    return not isinstance(err, PERMANENT) and type(err).__name__ not in PERMANENT_NAMES


class Retrier:
    """Retries calls through one storage outage: the deadline runs from the first failure
    and is shared by every call (and thread) using this object, so a long outage fails all
    waiting calls together instead of each waiting its own full deadline in turn."""

    def __init__(self, url: str | None, seconds: float | None = None, base_delay: float = 1.0,
                 attempts: int | None = None, wrap_permanent: bool = True) -> None:
        self.url = url
        self.wrap_permanent = wrap_permanent  # False: raise not-found & co. as they are
        self.seconds = retry_seconds() if seconds is None else seconds
        self.base_delay = base_delay
        self.attempts = attempts
        self.retries = 0  # retries made, over the object's life
        self._down_since: float | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_down_since": None}  # monotonic time is per process

    def call(self, fn: Callable[[], T], what: str) -> T:
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                out = fn()
            except Exception as err:  # noqa: BLE001 - sorted by is_transient
                self._failed(err, what, attempt, started)
                continue
            if self._down_since is not None:
                log.warning("storage %s reachable again after %.1f s; %s done",
                            self.url or "", time.monotonic() - self._down_since, what)
                self._down_since = None
            return out

    def _failed(self, err: Exception, what: str, attempt: int, started: float) -> None:
        """Sleeps before the next attempt, or raises StorageError. The outage is counted
        from the start of the first failed attempt (one attempt of s3fs may take ~5-30 s of
        botocore's own retries)."""
        where = f"storage {self.url}: " if self.url else ""
        if not is_transient(err):
            if not self.wrap_permanent:
                raise err
            raise StorageError(f"{where}{what} failed: {err!r}") from err
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = started
        down = now - self._down_since
        if down >= self.seconds or (self.attempts and attempt >= self.attempts):
            raise StorageError(
                f"{where}{what} failed after {attempt} attempts; unreachable for {down:.0f} s "
                f"({RETRY_SECONDS_ENV}={self.seconds:g}): {err!r}") from err
        delay = min(self.base_delay * 2 ** (attempt - 1), MAX_DELAY, self.seconds - down)
        self.retries += 1
        log.warning("%s%s failed (%s); retry %d in %.1f s", where, what, err, attempt,
                    max(delay, 0.0))
        time.sleep(max(delay, 0.0))


def with_retries(
    fn: Callable[[], T], what: str, attempts: int | None = None, base_delay: float = 1.0,
    url: str | None = None,
) -> T:
    """Calls ``fn`` until it succeeds, sleeping 1, 2, 4, ... (at most 30) s between tries, for
    at most ``DINO_STORAGE_RETRY_SECONDS`` (and ``attempts`` tries, if given). Errors that
    retrying cannot fix (not found, permission denied) raise StorageError at once."""
    return Retrier(url, base_delay=base_delay, attempts=attempts).call(fn, what)


class _SpooledUpload:
    """A write stream to ``path`` on storage: the bytes go to a local spool file; ``close``
    uploads it (retried) and deletes it, or keeps it under ``<spool>/kept/<path>`` if the
    upload never succeeds. (No ``__del__``: a stream pyarrow drops is not uploaded.)"""

    def __init__(self, handler: RetryingFSHandler, path: str) -> None:
        self.handler, self.path = handler, path
        inflight = spool_dir() / "inflight"
        inflight.mkdir(parents=True, exist_ok=True)
        fd, self.local = tempfile.mkstemp(dir=inflight, suffix="-" + path.rsplit("/", 1)[-1])
        self.file = os.fdopen(fd, "wb")
        self.closed = False

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:
        return self.file.write(b)

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.file.close()
        self.closed = True
        h = self.handler
        try:
            h.retrier.call(lambda: h.fs.put_file(self.local, self.path), f"upload of {self.path}")
        except Exception as err:
            kept = spool_dir() / "kept" / self.path.lstrip("/")
            kept.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.local, kept)
            log.error("upload of %s failed; the local copy is kept at %s", self.path, kept)
            failed = StorageError(f"{err if isinstance(err, StorageError) else repr(err)}; "
                                  f"the local copy is kept at {kept}")
            # pyarrow.fs.copy_files (how Ray uploads checkpoints) ignores errors raised by a
            # stream's close: every later call of this handler raises this one instead
            h.failed = h.failed or failed
            raise failed from err
        os.unlink(self.local)


class RetryingFSHandler(pyarrow.fs.FSSpecHandler):
    """An fsspec filesystem for pyarrow (Ray Train persists checkpoints through it) whose
    calls ride out storage outages (see ``Retrier``).

    Writes are spooled to local disk, so an upload can be resent, and kept there if storage
    does not come back in time; the handler then fails every later call with that error (the
    failed upload itself cannot fail ``pyarrow.fs.copy_files``). Two calls that only prepare a
    checkpoint upload answer at once during an outage instead of waiting it out, so that the
    checkpoint reaches the spool: ``create_dir`` (object stores have no directories) and the
    check of Ray's ``.validate_storage_marker`` (written when the run started). Reads are copied
    whole into a local temporary file, so an outage in the middle of a restore restarts that
    file instead of failing the restore.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, url: str,
                 seconds: float | None = None) -> None:
        super().__init__(fs)
        self.retrier = Retrier(url, seconds, wrap_permanent=False)  # pyarrow maps them
        self.failed: StorageError | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "failed": None}

    def _check(self, what: str) -> None:
        if self.failed is not None:
            raise StorageError(f"{what} refused after an earlier failure: {self.failed}")

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        self._check(what)
        return self.retrier.call(lambda: fn(*args), f"{what} {args[0] if args else ''}".strip())

    def _once(self, fn: Callable[[], T], what: str, fallback: T) -> T:
        """One try, none while an outage is known; ``fallback`` if storage cannot be reached
        (other errors are raised)."""
        self._check(what)
        if self.retrier._down_since is not None:
            return fallback
        started = time.monotonic()
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise
            if self.retrier._down_since is None:  # the outage clock starts here
                self.retrier._down_since = started
            log.warning("storage %s: %s failed (%s); going on without it", self.retrier.url,
                        what, err)
            return fallback

    def get_file_info(self, paths):
        sup = super().get_file_info
        out = []
        for p in paths:
            if p.endswith(RAY_MARKER):
                info = pyarrow.fs.FileInfo(p, pyarrow.fs.FileType.File)
                out.append(self._once(lambda p=p: sup([p])[0], f"stat {p}", info))
            else:
                out.append(self._call("stat", lambda p: sup([p])[0], p))
        return out

    def get_file_info_selector(self, selector):
        return self._call("listing", super().get_file_info_selector, selector)

    def create_dir(self, path, recursive):
        sup = super().create_dir
        return self._once(lambda: sup(path, recursive), f"mkdir {path}", None)

    def delete_dir(self, path):
        return self._call("delete", super().delete_dir, path)

    def delete_dir_contents(self, path, missing_dir_ok):
        return self._call("delete", super().delete_dir_contents, path, missing_dir_ok)

    def delete_file(self, path):
        return self._call("delete", super().delete_file, path)

    def move(self, src, dest):
        return self._call("move", super().move, src, dest)

    def copy_file(self, src, dest):
        return self._call("copy", super().copy_file, src, dest)

    def open_input_stream(self, path):
        return pyarrow.PythonFile(self._call("download", self._download, path), mode="r")

    def open_input_file(self, path):
        return pyarrow.PythonFile(self._call("download", self._download, path), mode="r")

    def _download(self, path: str) -> io.BufferedRandom:
        # fs.info, not fs.isfile: isfile answers False when the storage cannot be reached
        if self.fs.info(path)["type"] != "file":
            raise FileNotFoundError(path)
        local = tempfile.TemporaryFile()  # deleted when closed
        with self.fs.open(path, mode="rb") as src:
            shutil.copyfileobj(src, local, 1 << 24)
        local.seek(0)
        return local

    def open_output_stream(self, path, metadata):
        self._check(f"upload of {path}")
        return pyarrow.PythonFile(_SpooledUpload(self, path), mode="w")


def pyarrow_fs(url: str, seconds: float | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """``url`` as a pyarrow filesystem that waits out outages, and the path inside it."""
    fs, path = get_fs(url)
    return pyarrow.fs.PyFileSystem(RetryingFSHandler(fs, url, seconds)), path


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
