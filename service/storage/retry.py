"""Retrying storage calls through an outage: exponential backoff (1, 2, 4 ... 30 s) until
storage has been unreachable for ``retry_seconds`` (``configure``; the run's
``storage.retry_seconds``), then a ``StorageError`` naming the storage URL."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from service.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_DELAY = 30.0
# answers, not outages: retrying them only delays the same error
PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
             PermissionError, ValueError, TypeError, KeyError)
PERMANENT_NAMES = {"NoCredentialsError", "ParamValidationError"}  # botocore, not imported here
# the words every give-up message carries, so a driver can tell a storage failure apart
GAVE_UP = "storage.retry_seconds"


@dataclass
class StorageSettings:
    """How long storage may stay down before a call gives up, and where uploads wait (and
    stay, if they fail). Set from the run's ``storage`` config section by ``configure``."""

    # long enough to ride out a storage restart or a short network partition; training waits
    # at the checkpoint meanwhile, which costs less than losing the work since the last one
    retry_seconds: float = 300.0
    spool_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir(), "dino-spool"))


_settings = StorageSettings()


def configure(retry_seconds: float | None = None, spool_dir: str | Path | None = None) -> None:
    """Sets this process's storage settings; None keeps the default."""
    global _settings
    default = StorageSettings()
    _settings = StorageSettings(
        retry_seconds if retry_seconds is not None else default.retry_seconds,
        Path(spool_dir) if spool_dir else default.spool_dir,
    )


def settings() -> StorageSettings:
    return _settings


def retry_seconds() -> float:
    """How long storage may stay unreachable before a call gives up."""
    return _settings.retry_seconds


def spool_dir() -> Path:
    """Where writes wait for their upload, and stay if it never succeeds."""
    return _settings.spool_dir


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
            log.warning("%s%s failed (%s); retrying for up to %g s, until %s "
                        "(%s)", where, what, err, self.seconds,
                        time.strftime("%H:%M:%S", time.localtime(time.time() + self.seconds)),
                        GAVE_UP)
        down = now - self._down_since
        if down >= self.seconds or (self.attempts and attempt >= self.attempts):
            raise StorageError(
                f"{where}{what} failed after {attempt} attempts; unreachable for {down:.0f} s "
                f"({GAVE_UP}={self.seconds:g}): {err!r}") from err
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


