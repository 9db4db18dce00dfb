"""A Ray instance of a benchmark's own: started in a short temp dir (under ``RAY_TMPDIR``
when set), never any ``RAY_ADDRESS`` cluster; afterwards any process still running from that
dir is killed by pid, so a benchmark leaves nothing behind (never ``ray stop``, which would
stop every Ray on the machine)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def local_ray(num_cpus: int, **init_kwargs: Any) -> Iterator[str]:
    """``ray.init(address="local", num_cpus=...)`` with ``init_kwargs``; yields the temp dir."""
    import psutil
    import ray

    temp = tempfile.mkdtemp(prefix="dino-bray-", dir=os.environ.get("RAY_TMPDIR"))
    try:
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=temp, configure_logging=False,
                 **init_kwargs)
        yield temp
    finally:
        ray.shutdown()
        left = [p for p in psutil.process_iter(["cmdline"])
                if any(temp in arg for arg in p.info["cmdline"] or [])]
        for p in left:
            p.kill()
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)
