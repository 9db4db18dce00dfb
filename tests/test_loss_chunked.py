"""The chunked, fused head-last-layer + DINO loss against the plain path (``last_layer`` then
``DINOLoss``) and a naive loop over (teacher view, student view) pairs (Caron et al. 2021,
Eq. 1-4): values, gradients w.r.t. the bottleneck and the last-layer weight, the center.

That the chunked path never holds the ``(n_crops * B, K)`` scores is not asserted on the CPU;
the memory formula is in ``dino_core/losses/dino_chunked.py``.
"""

import pytest
import torch
import torch.nn.functional as F

from dino_core.losses.dino import DINOLoss
from dino_core.losses.dino_chunked import ChunkedDINOLoss, chunked_dino_loss
from dino_core.models.head import DINOHead

K = 1000
D = 16
T_S = 0.1


def make_inputs(n_crops, b, dtype, seed=0, k=K, d=D, n_global=2):
    """Unit-norm bottleneck rows and prototypes (``norm_last_layer``), teacher scores from the
    same prototypes, a nonzero center."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n_crops * b, d, generator=g, dtype=dtype), dim=-1)
    w = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=-1)
    teacher = F.normalize(torch.randn(n_global * b, d, generator=g, dtype=dtype), dim=-1) @ w.T
    center = 0.1 * torch.randn(1, k, generator=g, dtype=dtype)
    return z, w, teacher, center


def naive_loss(student, teacher, center, t_s, t_t, n_global):
    """Mean over (q, v != q) pairs of the batch-mean cross-entropy, written out per pair."""
    b = teacher.shape[0] // n_global
    n_crops = student.shape[0] // b
    total = 0.0
    for q in range(n_global):
        p = torch.softmax((teacher[q * b : (q + 1) * b] - center) / t_t, dim=-1)
        for v in range(n_crops):
            if v != q:
                logp = torch.log_softmax(student[v * b : (v + 1) * b] / t_s, dim=-1)
                total = total - (p * logp).sum(-1).mean()
    return total / (n_global * (n_crops - 1))


def dino_loss(scores, teacher, center, t_t, n_global=2):
    loss_fn = DINOLoss(scores.shape[1], student_temp=T_S)
    loss_fn.center.copy_(center)
    return loss_fn(scores, teacher, t_t, n_global=n_global, update_center=False)


def plain_loss(z, w, teacher, center, t_t):
    """The path the chunked loss replaces: the scores ``z W^T``, then ``DINOLoss``."""
    return dino_loss(z @ w.T, teacher, center, t_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_crops", [2, 4, 12])
@pytest.mark.parametrize("chunk", [128, 300, K])
@pytest.mark.parametrize("t_t", [0.04, 0.07])
def test_loss_equals_dino_loss(one_torch_thread, dtype, n_crops, chunk, t_t):
    b = 3 + n_crops % 3  # 5, 4, 3 images
    z, w, teacher, center = make_inputs(n_crops, b, dtype)
    center = center.float()  # DINOLoss keeps its center in fp32
    expected = plain_loss(z, w, teacher, center, t_t)
    got = chunked_dino_loss(z, teacher, w, center, t_t, T_S, n_global=2, chunk=chunk)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == ()
    torch.testing.assert_close(got.float(), expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("n_global,n_crops", [(2, 2), (2, 5), (1, 3), (3, 6)])
def test_loss_equals_naive_pair_loop_in_fp64(one_torch_thread, n_global, n_crops):
    z, w, teacher, center = make_inputs(n_crops, 4, torch.float64, seed=1, n_global=n_global)
    expected = naive_loss(z @ w.T, teacher, center, T_S, 0.04, n_global)
    got = chunked_dino_loss(z, teacher, w, center, 0.04, T_S, n_global=n_global, chunk=300)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("n_crops", [2, 4, 12])
@pytest.mark.parametrize("chunk", [128, 300, K])
def test_gradients_equal_autograd_of_the_plain_path(one_torch_thread, n_crops, chunk):
    z, w, teacher, center = make_inputs(n_crops, 4, torch.float32, seed=2)
    z1, w1 = z.clone().requires_grad_(), w.clone().requires_grad_()
    plain_loss(z1, w1, teacher, center, 0.04).backward()
    z2, w2 = z.clone().requires_grad_(), w.clone().requires_grad_()
    chunked_dino_loss(z2, teacher, w2, center, 0.04, T_S, chunk=chunk).backward()
    for got, expected in [(z2.grad, z1.grad), (w2.grad, w1.grad)]:
        assert got is not None and expected is not None
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("n_global,n_crops", [(2, 2), (2, 3), (1, 3)])
def test_gradcheck_in_fp64(one_torch_thread, n_global, n_crops):
    z, w, teacher, center = make_inputs(n_crops, 2, torch.float64, k=7, d=4, n_global=n_global)
    z.requires_grad_()
    w.requires_grad_()

    def loss(z, w):
        return chunked_dino_loss(z, teacher, w, center, 0.07, T_S, n_global=n_global, chunk=3)

    assert torch.autograd.gradcheck(loss, (z, w))


def test_module_updates_the_center_like_dino_loss(one_torch_thread):
    z, w, teacher, center = make_inputs(4, 3, torch.float32, seed=3)
    plain, fused = DINOLoss(K, center_momentum=0.9), ChunkedDINOLoss(DINOLoss(K), chunk=256)
    plain.center.copy_(center)
    fused.base.center.copy_(center)
    expected = plain(z @ w.T, teacher, 0.04, n_global=2)
    got = fused(z, w, teacher, 0.04, n_global=2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(fused.base.center, plain.center, rtol=0.0, atol=0.0)
    assert not torch.equal(fused.base.center, center)
    fused(z, w, teacher, 0.04, update_center=False)
    assert torch.equal(fused.base.center, plain.center)
    assert list(fused.state_dict()) == ["base.center"]


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_split_and_gradients_through_the_head(one_torch_thread, norm_last_layer):
    torch.manual_seed(4)
    head = DINOHead(8, 300, hidden_dim=32, bottleneck_dim=D, norm_last_layer=norm_last_layer)
    x = torch.randn(4 * 3, 8)
    assert torch.equal(head.last_layer(head.bottleneck(x)), head(x))
    assert torch.equal(F.linear(head.bottleneck(x), head.last_layer_weight()), head(x))
    assert head.last_layer_weight().shape == (300, D)
    if norm_last_layer:
        torch.testing.assert_close(head.last_layer_weight().norm(dim=1), torch.ones(300))
    teacher = torch.randn(2 * 3, 300) * 0.3
    center = torch.randn(1, 300) * 0.1

    dino_loss(head(x), teacher, center, 0.04).backward()
    expected = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    head.zero_grad(set_to_none=True)
    chunked_dino_loss(
        head.bottleneck(x), teacher, head.last_layer_weight(), center, 0.04, T_S, chunk=64
    ).backward()
    got = {n: p.grad for n, p in head.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    assert any("original0" in n for n in got) == (not norm_last_layer)
    for name, grad in got.items():
        ref = expected[name]
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * ref.abs().max(), msg=name)


def test_bf16_autocast_matches_the_plain_path_loosely(one_torch_thread):
    z, w, teacher, center = make_inputs(4, 4, torch.float32, seed=5)
    z1, w1 = z.clone().requires_grad_(), w.clone().requires_grad_()
    z2, w2 = z.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain_loss(z1, w1, teacher, center, 0.04)
        got = chunked_dino_loss(z2, teacher, w2, center, 0.04, T_S, chunk=300)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=0.0)
    expected.backward()
    got.backward()
    assert z2.grad is not None and z2.grad.dtype == torch.float32
    assert w2.grad is not None and w2.grad.dtype == torch.float32
    for g, ref in [(z2.grad, z1.grad), (w2.grad, w1.grad)]:
        assert ref is not None
        torch.testing.assert_close(g, ref, rtol=2e-2, atol=2e-2 * ref.abs().max())


@pytest.mark.parametrize(
    "shapes,n_global,chunk",
    [
        (((8, D), (6, K), (K, D)), 2, 128),  # 6 teacher rows are 3 images, 8 is not 3 * n
        (((3, D), (6, K), (K, D)), 2, 128),  # one crop of 3 images: nothing to pair with
        (((8, D), (4, K), (K, D + 1)), 2, 128),  # width mismatch
        (((8, D), (4, K + 1), (K, D)), 2, 128),  # K mismatch
        (((8, D), (4, K), (K, D)), 3, 128),  # 4 teacher rows into 3 views
        (((8, D), (4, K), (K, D)), 2, 0),
    ],
)
def test_rejects_inconsistent_shapes(shapes, n_global, chunk):
    z, teacher, w = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError):
        chunked_dino_loss(z, teacher, w, torch.zeros(1, K), 0.04, T_S, n_global, chunk)
