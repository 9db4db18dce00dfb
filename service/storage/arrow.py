"""A pyarrow filesystem over fsspec whose calls ride out storage outages; Ray Train persists
checkpoints through it. Writes are spooled to local disk first, so a retry can resend them,
and a file that never got through stays there (``<spool>/kept/<its storage path>``)."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec
import pyarrow
import pyarrow.fs

from service.errors import StorageError
from service.storage.fs import get_fs
from service.storage.retry import Retrier, is_transient, spool_dir

log = logging.getLogger(__name__)
T = TypeVar("T")
RAY_MARKER = "/.validate_storage_marker"  # Ray Train checks it before each checkpoint upload


class _SpooledUpload:
    """A write stream to ``path`` on storage: the bytes go to a local spool file; ``close``
    uploads it (retried) and deletes it, or keeps it under ``<spool>/kept/<path>`` if the
    upload never succeeds. (No ``__del__``: a stream pyarrow drops is not uploaded.)"""

    def __init__(self, handler: RetryingFSHandler, path: str) -> None:
        self.handler, self.path = handler, path
        inflight = handler.spool / "inflight"
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
            kept = h.spool / "kept" / self.path.lstrip("/")
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
        # taken now, in the driver: Ray runs the handler in its controller's process
        self.spool = spool_dir()

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
