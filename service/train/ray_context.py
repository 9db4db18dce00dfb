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

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None,
               background: bool = False) -> None:
        """``background``: Ray uploads the checkpoint in a thread of its own while training
        goes on (the next report waits for it); either way the local copy is removed once
        it is in storage."""
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        mode = (ray.train.CheckpointUploadMode.ASYNC if background
                else ray.train.CheckpointUploadMode.SYNC)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)

    def preemption_notice(self) -> Any:
        import ray.train

        return ray.train.get_preemption_info()

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
