"""Ray Train's torch backend, plus one thing on every worker before training starts: the
SIGTERM handler of ``service.train.stopping``, set on the worker's main thread (the
training function runs in a thread of its own, which may not set signal handlers)."""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.torch import TorchConfig

from service.train.ray_compat import torch_backend
from service.train.stopping import install_sigterm_handler


class _Backend(torch_backend()):  # type: ignore[misc]
    def on_training_start(self, worker_group, backend_config) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_sigterm_handler)  # an actor task: the main thread


@dataclass
class DinoTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _Backend
