"""How the project's log records reach the user from a Ray process.

The driver shows only ``[dino] ...`` lines of what Ray forwards from its processes (see
``service.cli.main.output_environment``): Ray's own output is noise to a user unless ``-v``.
A warning of ours in a Ray process (a storage retry, a skipped image, MLflow away) must still
be seen, so in a Ray worker process the ``service`` and ``dino_core`` loggers write their
records as ``[dino] WARNING <logger>: <message>`` lines of their own, on the process's stderr.
"""

from __future__ import annotations

import logging
import os
import sys

PROJECT_LOGGERS = ("service", "dino_core")


def in_ray_worker() -> bool:
    """This process is one Ray started for tasks and actors (Ray launches every one of them
    as ``.../ray/_private/workers/default_worker.py``)."""
    return os.path.basename(sys.argv[0] if sys.argv else "") == "default_worker.py"


class _DinoLines(logging.StreamHandler):
    """Marks the handler this module added, so that a second call adds none."""


def route_worker_logs(verbose: bool = False) -> None:
    """In a Ray worker process, the project's records at WARNING and above (INFO with
    ``verbose``) as ``[dino]`` lines; elsewhere (the driver, a test), nothing changes."""
    if not in_ray_worker():
        return
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        if any(isinstance(h, _DinoLines) for h in logger.handlers):
            continue
        handler = _DinoLines(sys.__stderr__)
        handler.setFormatter(logging.Formatter("[dino] %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # Ray's own handler would print it a second time
