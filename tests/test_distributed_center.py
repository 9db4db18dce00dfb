"""The center in a real 2-process gloo group equals the mean over the global batch."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_core import DINOLoss


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _worker(rank: int, world: int, init_file: str, teacher: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        per_rank = teacher.shape[0] // world
        # each rank holds its own slice of every global view (rows grouped by view)
        views = teacher.chunk(2)
        local = torch.cat([v[rank * per_rank // 2 : (rank + 1) * per_rank // 2] for v in views])
        student = torch.randn(local.shape[0] * 2, teacher.shape[1])
        loss = DINOLoss(teacher.shape[1], all_reduce_mean=all_reduce_mean)
        loss(student, local, 0.04)
        torch.save(loss.center, os.path.join(out_dir, f"center{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.budget(20)
def test_center_is_global_batch_mean():
    torch.manual_seed(0)
    world, k = 2, 32
    teacher = torch.randn(2 * 8, k)  # 2 global views x global batch 8
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), teacher, d), nprocs=world)
        centers = [torch.load(os.path.join(d, f"center{r}.pt")) for r in range(world)]
    expected = 0.1 * teacher.mean(dim=0, keepdim=True)  # c0 = 0, m = 0.9
    for c in centers:
        assert torch.allclose(c, expected, atol=1e-6)
