"""The few collectives the loop needs, correct for gloo (CPU) and NCCL (GPU), no-ops for one
rank."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _on_backend(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device) if dist.get_backend() == "nccl" else x


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (one all-reduce and host sync)."""
    value = torch.tensor(float(flag))
    if world_size > 1:
        value = _on_backend(value, device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
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
