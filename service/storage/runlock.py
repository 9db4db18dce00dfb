"""One driver per run: a second ``dino train`` of a run that is still going refuses to start.

Two drivers of one run name both write ``checkpoint_*`` directories into
``<storage.root>/<run_name>``, each overwrites the other's
``checkpoint_manager_snapshot.json`` and ``teacher_backbone.safetensors``, and the next resume
silently continues whichever wrote last. For a local (or NFS) storage root an ``flock`` on
``<run>/.dino-driver.lock``, held while the driver runs, prevents that; the kernel drops it
when the driver dies, even by SIGKILL, so a crashed run never needs cleaning up and the next
``dino train`` of that name resumes it. Object stores have no such lock: runs with an
``s3://`` or ``gs://`` root are not guarded.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.errors import RunInUseError
from service.storage import fs as storage

LOCK_FILE = ".dino-driver.lock"


@contextmanager
def hold(storage_root: str, run_name: str) -> Iterator[Path | None]:
    """Holds the run's lock for the ``with`` block; yields the lock file (None if remote).

    Raises:
        RunInUseError: another live process holds it; the message says which.
        StorageError: the root is not a folder this process can write to (a file, a
            read-only mount); checked before the lock's folder is made.
    """
    if not storage.is_local(storage_root):
        yield None
        return
    storage.check_writable(storage_root)
    path = Path(storage_root.removeprefix("file://"), run_name, LOCK_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise RunInUseError(
                f"run {run_name!r} is being trained right now by {holder} (lock {path}); "
                f"wait for it to finish or stop it to resume it, or give this run another "
                f"run_name=..."
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock
