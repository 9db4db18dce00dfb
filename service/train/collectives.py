"""The few collectives the loop needs, correct for gloo (CPU) and NCCL (GPU), no-ops for one
rank.

``any_rank`` runs every step (is any rank's batch all unreadable?). On NCCL it goes through a
gloo group of its own, on host tensors: the ranks' hosts meet, but none waits for its GPU
(through NCCL the flag would be a device tensor, and ``.item()`` a device sync per step)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _on_backend(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device) if dist.get_backend() == "nccl" else x


_HOST_GROUP: list = []  # the gloo group for host flags on NCCL runs, made on first use


def host_group():
    """None (the default group) on gloo; on NCCL a gloo group over the same ranks. Made on
    the first call, which every rank makes at the same step (``new_group`` is collective)."""
    if dist.get_backend() != "nccl":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank: one all-reduce of a host tensor, never a wait
    for the device."""
    value = torch.tensor(float(flag))
    if world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=host_group())
    return bool(value.item())


def sum_over_ranks(value: float, world_size: int, device: torch.device) -> float:
    total = torch.tensor(float(value), dtype=torch.float64)
    if world_size > 1:
        total = _on_backend(total, device)
        dist.all_reduce(total)
    return float(total.item())


def broadcast_from_rank0(values: torch.Tensor, world_size: int,
                         device: torch.device) -> torch.Tensor:
    if world_size > 1:
        values = _on_backend(values, device)
        dist.broadcast(values, src=0)
    return values.cpu()
