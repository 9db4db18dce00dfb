"""The one way into distributed state: rank, world size, device, reporting and checkpoints.

The loop (``service.train.loop``) sees only a ``RunContext``. ``RayContext``
(``service.train.ray_context``) is the Ray Train worker's; ``InProcessContext`` runs the same
loop in this process, as one rank, writing checkpoints into the run folder the way Ray's
storage does (``checkpoint_<UTC time>`` directories, the last ``keep_last`` kept).
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Protocol

import torch
from torch import nn

from service import storage
from service.errors import ConfigError
from service.storage import checkpoints as ckpt


class RunContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None,
               background: bool = False) -> None:
        """Every rank reports the same number of times; only rank 0 passes a checkpoint (a
        local folder the context removes once stored; ``background``: stored while training
        goes on)."""

    def preemption_notice(self) -> Any:
        """Not None while a node of the group is being drained (Ray's preemption info)."""

    def registered_checkpoint(self) -> str | None:
        """The URL of the newest checkpoint the scheduler knows of (None: none or unknown)."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The student as the step should call it (DDP over several workers)."""

    def dataset_shard(self, name: str) -> Any:
        """This rank's share of a Ray Dataset given to the trainer (``data.loader=ray_data``)."""


def checkpoint_name() -> str:
    """``checkpoint_2026-12-01_10-00-00.123456``: Ray's naming, which sorts by time."""
    now = time.time()
    return (f"{ckpt.CHECKPOINT_PREFIX}{time.strftime('%Y-%m-%d_%H-%M-%S', time.gmtime(now))}"
            f".{int(now % 1 * 1e6):06d}")


class InProcessContext:
    """One rank in this process; checkpoints are copied into ``run_url`` (local or URL).

    Attributes:
        reports: Every ``(metrics, checkpoint URL or None)`` reported, in order.
    """

    def __init__(self, run_url: str, keep_last: int = 3, device: str = "cpu") -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.run_url, self.keep_last = run_url, keep_last
        self.reports: list[tuple[dict[str, Any], str | None]] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None,
               background: bool = False) -> None:
        """Stores the checkpoint before it returns (``background`` is for Ray's workers)."""
        url = None
        if checkpoint_dir is not None:
            url = storage.join(self.run_url, checkpoint_name())
            if storage.is_local(url):
                shutil.copytree(checkpoint_dir, url.removeprefix("file://"))
            else:
                storage.upload_dir(checkpoint_dir, url)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            self._prune()
        self.reports.append((dict(metrics), url))

    def _prune(self) -> None:
        for old in ckpt.checkpoint_dirs(self.run_url)[: -self.keep_last]:
            fs, path = storage.get_fs(old)
            fs.rm(path, recursive=True)

    def preemption_notice(self) -> Any:
        return None

    def registered_checkpoint(self) -> str | None:
        found = ckpt.checkpoint_dirs(self.run_url)
        return found[-1] if found else None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def dataset_shard(self, name: str) -> Any:
        raise ConfigError("data.loader=ray_data streams from a Ray Dataset: it needs Ray "
                          "(`dino train`); the loop in this process reads with data.loader=torch")
