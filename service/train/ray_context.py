"""``RunContext`` of a Ray Train worker: ranks and device from Ray, reports to Ray Train."""

from __future__ import annotations

from typing import Any

from torch import nn

from service import storage


class RayContext:
    def __init__(self, run_url: str) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_url = run_url

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir)
        ray.train.report(metrics, checkpoint=checkpoint)

    def registered_checkpoint(self) -> str | None:
        import ray.train

        registered = ray.train.get_checkpoint()
        return storage.with_scheme(str(registered.path), self.run_url) if registered else None

    def dataset_shard(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        if self.world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False)
