"""The DINO loss fused with the head's last layer, chunked over the K prototypes.

Same value and gradients as ``DINOHead.last_layer`` followed by ``DINOLoss`` (Caron et al.
2021, Eq. (1)-(4)), without ever holding the student's ``(n_crops * B, K)`` scores. With
``s_v = z_v W^T / tau_s`` the scaled scores of student view ``v`` and ``p_q`` the teacher's
probabilities of global view ``q`` (both per image), the loss regroups per student view:

    L = -1 / (P B) sum_v sum_b [ c_v . s_v - |c_v|_1 lse(s_v) ],   P = n_global (n_crops - 1),
    c_v = sum_{q < n_global, q != v} p_q,

so one pass over chunks of K with an online log-sum-exp gives the loss, and the backward
recomputes each chunk's scores for ``dL/ds_v = -(c_v - |c_v|_1 softmax(s_v)) / (P B)``.

Memory (N = n_crops * B rows, G = n_global * B teacher rows, c = chunk, a = bytes of the
accumulation dtype, 4 for fp32/bf16/fp16 inputs, m = bytes of the matmul dtype, D the
bottleneck width):

* held from forward to backward, besides ``z`` and ``W`` (the caller holds them anyway): the
  teacher probabilities ``G K a`` (the plain path holds these too) and two ``(N,)`` vectors;
* transient: about ``3 N c a`` (one chunk's scores, its pair products or gradient, one
  temporary), plus the gradients ``dz`` ``(N, D)`` and ``dW`` ``K D m``, which the plain path
  allocates as well.

The plain path (``last_layer`` then ``DINOLoss``) saves the fp32 log-softmax ``N K 4`` for
the backward and peaks at about ``3 N K 4`` (scores, scaled scores, log-softmax; in the
backward their three gradients), more where the caller keeps the scores alive. Peak RSS
over the inputs, measured on CPU (``MALLOC_MMAP_THRESHOLD_=65536``, so freed buffers leave)
for N = 12 * 16, K = 65536, D = 256 (``N K 4`` = 50 MB), fp32: plain 157 MB; chunked 91 MB at c = 8192 and 80 MB at c = 2048, of which 64 MB is
``dW`` and 8 MB the teacher probabilities. For ViT-S/16 (B = 64 per GPU) ``N K 4`` = 201 MB:
about 0.6 GB of loss buffers for the plain path against 75 MB (c = 8192) plus 34 MB of
teacher probabilities for this one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dino_core.losses.dino import DINOLoss


def chunked_dino_loss(
    student_z: torch.Tensor,
    teacher_out: torch.Tensor,
    weight: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
    n_global: int = 2,
    chunk: int = 8192,
) -> torch.Tensor:
    """The DINO loss of ``student_z @ weight.T`` against ``teacher_out``, chunked over K.

    Equals ``DINOLoss(...)(student_z @ weight.T, teacher_out, ...)`` (with the same center and
    temperatures), with gradients w.r.t. ``student_z`` and ``weight``; the teacher side gets
    none (stop-gradient). The center is not updated here (``ChunkedDINOLoss`` does that).

    Args:
        student_z: ``(n_crops * B, D)``, the student head's l2-normalised bottleneck
            (``DINOHead.bottleneck``), rows grouped by crop, global crops first.
        teacher_out: ``(n_global * B, K)``, the teacher's scores on the global crops, computed
            normally (no grad, only the global rows).
        weight: ``(K, D)``, the student's effective last-layer weight
            (``DINOHead.last_layer_weight()``).
        center: ``(1, K)``, subtracted from the teacher's scores before sharpening.
        teacher_temp: tau_t of this iteration.
        student_temp: tau_s.
        n_global: number of global crops.
        chunk: prototypes per chunk; any positive size (K need not be a multiple).

    Returns:
        The scalar loss, fp32 (fp64 for fp64 inputs). Under autocast the matmuls run in the
        autocast dtype, as ``last_layer`` would; everything else accumulates in fp32.
    """
    n, d = student_z.shape
    k = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight is {tuple(weight.shape)}, expected (K, {d})")
    if teacher_out.dim() != 2 or teacher_out.shape[1] != k:
        raise ValueError(f"teacher_out is {tuple(teacher_out.shape)}, expected (n_global*B, {k})")
    if n_global < 1 or teacher_out.shape[0] % n_global:
        raise ValueError(f"{teacher_out.shape[0]} teacher rows do not split into {n_global} views")
    b = teacher_out.shape[0] // n_global
    if b == 0 or n % b or n // b < max(n_global, 2):
        raise ValueError(f"{n} student rows are not n_crops >= max(n_global, 2) views of {b}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    device_type = student_z.device.type
    if torch.is_autocast_enabled(device_type):
        mm_dtype = torch.get_autocast_dtype(device_type)
    else:
        mm_dtype = torch.promote_types(student_z.dtype, weight.dtype)
    acc = torch.promote_types(mm_dtype, torch.float32)
    with torch.autocast(device_type, enabled=False):
        with torch.no_grad():  # stop-gradient: the teacher only receives the EMA of the student
            teacher_p = F.softmax((teacher_out.to(acc) - center.to(acc)) / teacher_temp, dim=-1)
        loss: torch.Tensor = _FusedDINOCrossEntropy.apply(
            student_z.to(mm_dtype), weight.to(mm_dtype), teacher_p, student_temp, n_global, chunk
        )
    return loss


def chunked_dino_cross_entropy(
    student_z: torch.Tensor,
    teacher_p: torch.Tensor,
    weight: torch.Tensor,
    student_temp: float,
    n_global: int = 2,
    chunk: int = 8192,
) -> torch.Tensor:
    """``chunked_dino_loss`` with the teacher's targets given: ``(n_global * B, K)``
    probabilities, however they were centred (Sinkhorn-Knopp in the DINOv2 recipe). Equals
    ``dino_cross_entropy(student_z @ weight.T, teacher_p, ...)``."""
    k = weight.shape[0]
    if teacher_p.dim() != 2 or teacher_p.shape[1] != k or teacher_p.shape[0] % n_global:
        raise ValueError(f"teacher_p is {tuple(teacher_p.shape)}, expected (n_global*B, {k})")
    device_type = student_z.device.type
    if torch.is_autocast_enabled(device_type):
        mm_dtype = torch.get_autocast_dtype(device_type)
    else:
        mm_dtype = torch.promote_types(student_z.dtype, weight.dtype)
    acc = torch.promote_types(mm_dtype, torch.float32)
    with torch.autocast(device_type, enabled=False):
        loss: torch.Tensor = _FusedDINOCrossEntropy.apply(
            student_z.to(mm_dtype), weight.to(mm_dtype), teacher_p.detach().to(acc),
            student_temp, n_global, chunk,
        )  # fmt: skip
    return loss


class ChunkedDINOLoss(nn.Module):
    """``chunked_dino_loss`` with the center and temperature of a ``DINOLoss``.

    The ``DINOLoss`` is kept as a submodule and owns the center (its state-dict key, its
    all-reduce and ``update_center``), so a checkpoint of ``base`` works for either path.

    Args:
        base: the loss whose center, ``student_temp`` and center update are used.
        chunk: prototypes per chunk.
    """

    def __init__(self, base: DINOLoss, chunk: int = 8192) -> None:
        super().__init__()
        self.base = base
        self.chunk = chunk

    def forward(
        self,
        student_z: torch.Tensor,
        weight: torch.Tensor,
        teacher_out: torch.Tensor,
        teacher_temp: float,
        n_global: int = 2,
        update_center: bool = True,
    ) -> torch.Tensor:
        """The loss of ``student_z @ weight.T`` (shapes as in ``chunked_dino_loss``), then the
        center update on ``teacher_out`` unless ``update_center`` is False."""
        loss = chunked_dino_loss(
            student_z,
            teacher_out,
            weight,
            self.base.center,
            teacher_temp,
            self.base.student_temp,
            n_global,
            self.chunk,
        )
        if update_center:
            self.base.update_center(teacher_out)
        return loss


def _paired_sum(x: torch.Tensor) -> torch.Tensor:
    """``(n_crops, n_global, B)`` per (student view v, teacher view q, image) to its sum over
    the pairs ``q != v``, ``(n_crops * B,)`` in the student's row order."""
    n_crops, n_global = x.shape[:2]
    pairs = torch.ones(n_crops, n_global, 1, dtype=x.dtype, device=x.device)
    pairs[:n_global].diagonal().zero_()  # a view is never its own teacher
    return (x * pairs).sum(1).flatten()


def _scores(z: torch.Tensor, w: torch.Tensor, tau: float, acc: torch.dtype) -> torch.Tensor:
    """``(z @ w.T) / tau`` in ``acc``: one chunk's ``s``, rounded like the plain path (scores in
    the matmul dtype, then cast and divided)."""
    s = (z @ w.T).to(acc)
    return s.div_(tau)


class _FusedDINOCrossEntropy(torch.autograd.Function):
    """The regrouped loss and its recomputing backward; see the module docstring.

    ``c_v`` is never built: the forward takes every ``p_q . s_v`` of a chunk in one einsum and
    sums the pairs, the backward subtracts each ``p_q`` in place from the rows it pairs with.
    """

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        weight: torch.Tensor,
        teacher_p: torch.Tensor,
        tau: float,
        n_global: int,
        chunk: int,
    ) -> torch.Tensor:
        acc = teacher_p.dtype
        n, k = z.shape[0], weight.shape[0]
        b = teacher_p.shape[0] // n_global
        n_crops = n // b
        run_max = z.new_full((n,), float("-inf"), dtype=acc)
        run_sum = z.new_zeros((n,), dtype=acc)
        dots = z.new_zeros((n_crops, n_global, b), dtype=acc)  # p_q . s_v per image
        for k0 in range(0, k, chunk):
            s = _scores(z, weight[k0 : k0 + chunk], tau, acc)
            p = teacher_p[:, k0 : k0 + chunk].unflatten(0, (n_global, b))
            dots += torch.einsum("qbk,vbk->vqb", p, s.unflatten(0, (n_crops, b)))
            new_max = torch.maximum(run_max, s.amax(1))
            # online log-sum-exp: rescale the running sum to the new max (Milakov & Gimelshein)
            chunk_sum = s.sub_(new_max[:, None]).exp_().sum(1)
            run_sum = run_sum * torch.exp(run_max - new_max) + chunk_sum
            run_max = new_max
        lse = run_max + run_sum.log()
        # |c_v|_1: the teacher mass paired with each row (n_global - 1 or n_global, up to rounding)
        mass = _paired_sum(teacher_p.sum(1).unflatten(0, (n_global, b)).expand(n_crops, -1, -1))
        ctx.save_for_backward(z, weight, teacher_p, lse, mass)
        ctx.tau, ctx.n_global, ctx.n_crops, ctx.chunk = tau, n_global, n_crops, chunk
        return -(_paired_sum(dots) - mass * lse).sum() / (n_global * (n_crops - 1) * b)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, weight, teacher_p, lse, mass = ctx.saved_tensors
        tau, n_global, n_crops, chunk = ctx.tau, ctx.n_global, ctx.n_crops, ctx.chunk
        acc = teacher_p.dtype
        k, b = weight.shape[0], z.shape[0] // n_crops
        want_z, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # dL/dscore_v = (|c_v|_1 softmax(s_v) - c_v) / (tau P B), times the incoming gradient
        scale = grad_loss.to(acc) / (tau * n_global * (n_crops - 1) * b)
        grad_z = z.new_zeros(z.shape, dtype=acc) if want_z else None
        grad_w = torch.empty_like(weight) if want_w else None
        with torch.autocast(z.device.type, enabled=False):
            for k0 in range(0, k, chunk):
                w = weight[k0 : k0 + chunk]
                g = _scores(z, w, tau, acc).sub_(lse[:, None]).exp_().mul_(mass[:, None])
                views = g.unflatten(0, (n_crops, b))
                for q, p_q in enumerate(teacher_p[:, k0 : k0 + chunk].unflatten(0, (n_global, b))):
                    for v in range(n_global):
                        if v != q:
                            views[v] -= p_q
                    views[n_global:] -= p_q  # every local view pairs with every global one
                g = g.mul_(scale).to(z.dtype)
                if grad_z is not None:
                    grad_z += (g @ w).to(acc)
                if grad_w is not None:
                    torch.mm(g.T, z, out=grad_w[k0 : k0 + chunk])
        return (
            None if grad_z is None else grad_z.to(z.dtype),
            grad_w,
            None,
            None,
            None,
            None,
        )
