"""The few collectives the loop needs, correct for gloo (CPU) and NCCL (GPU), no-ops for one
rank.

``max_over_ranks`` runs every step (is any rank's batch all unreadable? a stop notice?). On NCCL it goes through a
gloo group of its own, on host tensors: the ranks' hosts meet, but none waits for its GPU
(through NCCL the flag would be a device tensor, and ``.item()`` a device sync per step)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (Sinkhorn-Knopp, the iBOT center: ``dino_core``'s injected sum)."""
    x = x.clone()
    dist.all_reduce(x)
    return x


def all_gather_rows_differentiable(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``(B, D)`` rows, rank order, and the index of this rank's first row: the
    distributed KoLeo's gather. Differentiable (``torch.distributed.nn``), so a neighbour's
    side of a distance sends its gradient to the rank that owns it; every rank holds B rows."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # torch 2.14 points to a private successor; this one works
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x)
    return torch.cat(parts), dist.get_rank() * x.shape[0]


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


def all_gather_rows(x: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    """Every rank's rows, in rank order, on every rank (on the host).

    Args:
        x: this rank's ``(n_r, *rest)``; ``n_r`` may differ between ranks (each share is
            padded to the longest for ``all_gather``, then trimmed). Every rank passes the
            same number of dimensions and dtype; an empty share may leave ``rest`` unknown
            (e.g. ``(0, 0)``): it takes the others'.
        world_size: ranks in the default group; with one, ``x`` comes back as it is.
        device: this rank's device; NCCL gathers there, gloo on the host.

    Returns:
        ``(sum_r n_r, *rest)``: rank 0's rows first.

    Raises:
        ValueError: two non-empty shares differ in ``rest`` (on every rank alike).
    """
    if world_size == 1:
        return x.cpu()
    shape = _on_backend(torch.tensor(x.shape, dtype=torch.int64), device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    sizes = [s.tolist() for s in shapes]
    rests = {tuple(s[1:]) for s in sizes if s[0] > 0}
    if len(rests) > 1:
        raise ValueError(f"all_gather_rows: the ranks' rows differ in shape: {sizes}")
    rest = rests.pop() if rests else tuple(x.shape[1:])
    longest = max(s[0] for s in sizes)
    padded = x.new_zeros((longest, *rest))
    padded[: x.shape[0]] = x.reshape(x.shape[0], *rest)
    padded = _on_backend(padded, device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: s[0]].cpu() for p, s in zip(parts, sizes, strict=True)])


def max_over_ranks(values: list[float], world_size: int) -> list[float]:
    """The element-wise maximum of ``values`` over the ranks: one all-reduce of a host
    tensor, never a wait for the device."""
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=host_group())
    return x.tolist()
