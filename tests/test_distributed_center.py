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


def _step_worker(rank: int, world: int, init_file: str, spec, crops, out_dir: str) -> None:
    """One real DINO step on this rank's slice of one fixed global batch: the student wrapped
    in DDP as ``ray.train.torch.prepare_model`` wraps it, the center reduced through the
    service's collective (what a Ray Train worker runs, without Ray: the 2-worker Ray runs of
    the suite cover Ray's own process group)."""
    from torch.nn.parallel import DistributedDataParallel

    from dino_core import build_networks, build_optimizer, ema_parameter_lists, train_step
    from dino_core.losses.dino import identity
    from dino_core.step import StepConfig
    from service.train.collectives import all_reduce_mean as service_mean

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        student, teacher = build_networks(spec)
        per = crops[0].shape[0] // world
        local = [c[rank * per : (rank + 1) * per] for c in crops]
        reduce = service_mean if world > 1 else identity
        loss_fn = DINOLoss(spec.out_dim, all_reduce_mean=reduce)
        model = DistributedDataParallel(student) if world > 1 else student
        train_step(student=model, teacher=teacher, loss_fn=loss_fn,
                   optimizer=build_optimizer(student), crops=local,
                   values={"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.996,
                           "teacher_temp": 0.04},
                   step=0, freeze_last_layer=False,
                   ema_params=ema_parameter_lists(teacher, student),
                   cfg=StepConfig(all_reduce_mean=reduce), clip_module=student)
        torch.save(loss_fn.center, os.path.join(out_dir, f"center-w{world}-r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.budget(30)
def test_two_rank_step_center_equals_one_rank_center():
    """A whole training step (DDP student, multi-crop, the service's all-reduce) on 2 gloo
    ranks leaves on every rank the center one rank computes from the whole batch."""
    from dino_core import NetworkSpec

    spec = NetworkSpec(arch="vit_tiny", patch_size=8, img_size=16, depth=1, out_dim=64,
                       head_hidden_dim=32, head_bottleneck_dim=16, drop_path_rate=0.0)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)] + \
        [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    with tempfile.TemporaryDirectory() as d:
        threads = torch.get_num_threads()
        try:  # one rank: here (a spawned process costs seconds of imports)
            _step_worker(0, 1, os.path.join(d, "init1"), spec, crops, d)
        finally:
            torch.set_num_threads(threads)
        mp.spawn(_step_worker, args=(2, os.path.join(d, "init2"), spec, crops, d), nprocs=2)
        one = torch.load(os.path.join(d, "center-w1-r0.pt"))
        two = [torch.load(os.path.join(d, f"center-w2-r{r}.pt")) for r in range(2)]
    assert one.abs().sum() > 0
    for c in two:  # every rank holds the global-batch center
        assert torch.allclose(c, one, atol=1e-6)
