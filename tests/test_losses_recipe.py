"""The DINOv2/DINOv3 loss components against naive loops of their formulas: Sinkhorn-Knopp
(SwAV Alg. 1 as dinov2 writes it), the EMA center, iBOT's per-image masked-patch
cross-entropy, KoLeo's nearest-neighbour log-distance and DINOv3's Gram anchoring; each with a
mutated reference the implementation must NOT match, so a changed formula cannot pass. The
distributed Sinkhorn-Knopp, EMA center and KoLeo run on 2 and 3 real gloo processes (one
launch) and must equal one process holding the whole batch."""

from __future__ import annotations

import math
import os
import socket
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_core.losses import (
    GramLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    ema_center_update,
    gram_loss,
    gram_refresh_due,
    gram_refreshes_before,
    gram_weight,
    ibot_cross_entropy,
    koleo_loss,
    sinkhorn_knopp,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------- naive references
def naive_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """dinov2's ``sinkhorn_knopp_teacher`` spelled out over prototypes k and samples b, in
    Python floats (double): Q[k][b] = exp(s_bk / temp), the 1/K and 1/B factors included."""
    rows = logits.double().tolist()
    n_b, n_k = len(rows), len(rows[0])
    q = [[math.exp(rows[b][k] / temp) for b in range(n_b)] for k in range(n_k)]
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(n_iterations):
        for k in range(n_k):
            row_sum = sum(q[k])
            q[k] = [v / row_sum / n_k for v in q[k]]
        for b in range(n_b):
            col_sum = sum(q[k][b] for k in range(n_k))
            for k in range(n_k):
                q[k][b] = q[k][b] / col_sum / n_b
    return torch.tensor([[q[k][b] * n_b for k in range(n_k)] for b in range(n_b)])


def naive_softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def naive_ibot(student, teacher_probs, masks, t_s, per_image=True, divide_by="all"):
    """-1/B sum_b 1/|M_b| sum_{p in M_b} t_p . log softmax(s_p / t_s), patch by patch.
    ``per_image=False`` and ``divide_by="masked"`` are the mutations."""
    total, row, n_images_masked, all_patches = 0.0, 0, 0, 0
    for b in range(masks.shape[0]):
        patches = [p for p in range(masks.shape[1]) if masks[b, p]]
        image = 0.0
        for _ in patches:
            log_p = [math.log(v) for v in naive_softmax([x / t_s for x in student[row].tolist()])]
            image -= sum(t * lp for t, lp in zip(teacher_probs[row].tolist(), log_p))
            row += 1
        total += image / len(patches) if (patches and per_image) else image
        n_images_masked += bool(patches)
        all_patches += len(patches)
    if not per_image:
        return total / max(all_patches, 1)
    return total / (masks.shape[0] if divide_by == "all" else max(n_images_masked, 1))


def naive_teacher_probs(teacher, center, t_t):
    return torch.tensor(
        [
            naive_softmax([(x - c) / t_t for x, c in zip(row, center[0].tolist())])
            for row in teacher.tolist()
        ]
    )


def naive_koleo(x, eps=1e-8, self_neighbour=False, normalize=True) -> torch.Tensor:
    """-1/B sum_i log(|x_i - x_j + eps| + eps), j the nearest other row, each row scaled to norm 1
    (autograd through the loop, so gradients can be compared too). ``self_neighbour`` and
    ``normalize=False`` are the mutations."""
    rows = [r / torch.clamp(r.norm(), min=eps) if normalize else r for r in x.double().unbind(0)]
    total = x.new_zeros((), dtype=torch.float64)
    for i, r in enumerate(rows):
        others = [j for j in range(len(rows)) if self_neighbour or j != i]
        j = min(others, key=lambda j: float((r - rows[j]).detach().norm()))
        total = total - torch.log((r - rows[j] + eps).norm() + eps)
    return total / len(rows)


def naive_gram(s, t, normalize=True, img_level=True, neg="keep"):
    """Mean over every (image, patch i, patch j) of (G_s[i, j] - G_t[i, j])^2."""
    s, t = s.double(), t.double()
    if normalize:
        s, t = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    groups = (
        [(s[b], t[b]) for b in range(s.shape[0])]
        if img_level
        else [(s.flatten(0, 1), t.flatten(0, 1))]
    )
    total, count = 0.0, 0
    for gs_rows, gt_rows in groups:
        for i in range(gs_rows.shape[0]):
            for j in range(gs_rows.shape[0]):
                gs, gt = float(gs_rows[i] @ gs_rows[j]), float(gt_rows[i] @ gt_rows[j])
                if neg == "remove":
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                elif neg == "teacher":
                    gs = 0.0 if (gs < 0 and gt < 0) else gs
                    gt = max(gt, 0.0)
                total += (gs - gt) ** 2
                count += 1
    return total / count


# ---------------------------------------------------------------------- Sinkhorn-Knopp
@pytest.mark.parametrize("shape", [(6, 4), (17, 9), (3, 32)])
@pytest.mark.parametrize("temp", [0.04, 0.1, 1.0])
@pytest.mark.parametrize("n_iterations", [1, 3])
def test_sinkhorn_matches_naive(shape, temp, n_iterations):
    torch.manual_seed(shape[0] + shape[1])
    logits = torch.randn(shape)
    q = sinkhorn_knopp(logits, temp, n_iterations)
    assert _close(q, naive_sinkhorn(logits, temp, n_iterations))
    assert _close(q.sum(1), torch.ones(shape[0]))


def test_sinkhorn_mutations_do_not_match():
    """One iteration more or less, or another temperature, is caught."""
    torch.manual_seed(0)
    logits = torch.randn(12, 8)
    q = sinkhorn_knopp(logits, 0.1, 3)
    assert _close(q, naive_sinkhorn(logits, 0.1, 3))
    for wrong in (
        naive_sinkhorn(logits, 0.1, 2),
        naive_sinkhorn(logits, 0.1, 4),
        naive_sinkhorn(logits, 0.15, 3),
    ):
        assert (q.double() - wrong).abs().max() > 1e-3


def test_sinkhorn_valid_rows_and_offsets():
    """Padding rows count nowhere and come back as 0; a logit offset that would overflow
    ``exp(s / 0.04)`` in fp32 changes nothing."""
    torch.manual_seed(1)
    logits = torch.randn(10, 6)
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    padded = logits.clone()
    padded[~valid] = 1e4  # garbage in the padding must not leak in
    q = sinkhorn_knopp(padded, 0.04, 3, valid=valid)
    assert _close(q[valid], naive_sinkhorn(logits[valid], 0.04, 3))
    assert torch.count_nonzero(q[~valid]) == 0
    shifted = sinkhorn_knopp(logits + 30.0, 0.04, 3)  # exp(30 / 0.04) is inf in fp32
    assert torch.isfinite(shifted).all()
    assert _close(shifted, naive_sinkhorn(logits, 0.04, 3), tol=1e-4)


# ---------------------------------------------------------------------- EMA center
def test_ema_center_is_the_mean_over_valid_rows():
    torch.manual_seed(2)
    rows, valid = torch.randn(7, 5), torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    c0 = torch.randn(1, 5)
    mean = [
        sum(rows[i, k].item() for i in range(7) if valid[i]) / int(valid.sum()) for k in range(5)
    ]
    expected = 0.9 * c0 + 0.1 * torch.tensor([mean])
    center = c0.clone()
    ema_center_update(center, rows, 0.9, valid=valid)
    assert _close(center, expected, tol=1e-6)
    wrong = 0.9 * c0 + 0.1 * rows.mean(0, keepdim=True)  # mutation: padding rows counted
    assert (center - wrong).abs().max() > 1e-3
    for no_change in (
        {"valid": torch.zeros(7, dtype=torch.bool)},
        {"keep_if": torch.tensor(False)},
    ):
        center = c0.clone()
        ema_center_update(center, rows, 0.9, **no_change)
        assert torch.equal(center, c0)


# ---------------------------------------------------------------------- iBOT
def _masks(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(b, n, generator=g) < 0.5
    masks[0] = False  # an unmasked image among the masked ones, as dinov2's batches have
    if b > 1:
        masks[1, : n // 2 + 1] = True
    return masks


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("n_patches", [4, 9])
@pytest.mark.parametrize("k", [5, 16])
@pytest.mark.parametrize("temps", [(0.1, 0.04), (0.2, 0.07)])
def test_ibot_ema_matches_naive(batch, n_patches, k, temps):
    t_s, t_t = temps
    masks = _masks(batch, n_patches, seed=batch * n_patches + k)
    m = int(masks.sum())
    torch.manual_seed(k)
    student, teacher = torch.randn(m, k), torch.randn(m, k)
    loss_fn = IBOTPatchLoss(k, student_temp=t_s, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k) * 0.3)
    c0 = loss_fn.center.clone()
    loss = loss_fn(student, teacher, masks, t_t)
    expected = naive_ibot(student, naive_teacher_probs(teacher, c0, t_t), masks, t_s)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5, abs_tol=1e-6)
    if m:
        mean = [sum(teacher[i, j].item() for i in range(m)) / m for j in range(k)]
        assert _close(loss_fn.center, 0.9 * c0 + 0.1 * torch.tensor([mean]), tol=1e-6)
    else:
        assert loss.item() == 0.0 and torch.equal(loss_fn.center, c0)


def test_ibot_mutations_do_not_match():
    """Missing centering, a wrong temperature, one mean over all masked patches, or a mean
    over the masked images only: each is caught."""
    torch.manual_seed(3)
    masks = _masks(4, 9, seed=3)
    m, k = int(masks.sum()), 8
    student, teacher = torch.randn(m, k), torch.randn(m, k)
    center = torch.randn(1, k) * 0.5
    loss_fn = IBOTPatchLoss(k)
    loss_fn.center.copy_(center)
    loss = loss_fn(student, teacher, masks, 0.04).item()
    probs = naive_teacher_probs(teacher, center, 0.04)
    assert math.isclose(loss, naive_ibot(student, probs, masks, 0.1), rel_tol=1e-5)
    mutants = [
        naive_ibot(student, naive_teacher_probs(teacher, torch.zeros(1, k), 0.04), masks, 0.1),
        naive_ibot(student, naive_teacher_probs(teacher, center, 0.07), masks, 0.1),
        naive_ibot(student, probs, masks, 0.2),
        naive_ibot(student, probs, masks, 0.1, per_image=False),
        naive_ibot(student, probs, masks, 0.1, divide_by="masked"),
    ]
    for wrong in mutants:
        assert abs(loss - wrong) > 1e-3 * abs(wrong)


def test_ibot_sinkhorn_targets_and_gradients():
    """With Sinkhorn-Knopp centering the targets are the naive SK of the masked patches;
    the gradient reaches the student only, and no center moves."""
    torch.manual_seed(4)
    masks = _masks(3, 9, seed=4)
    m, k = int(masks.sum()), 6
    student = torch.randn(m, k, requires_grad=True)
    teacher = torch.randn(m, k, requires_grad=True)
    loss_fn = IBOTPatchLoss(k, centering="sinkhorn_knopp")
    loss = loss_fn(student, teacher, masks, 0.07)
    expected = naive_ibot(student.detach(), naive_sinkhorn(teacher.detach(), 0.07, 3), masks, 0.1)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert torch.count_nonzero(loss_fn.center) == 0
    assert math.isclose(
        ibot_cross_entropy(student.detach(), loss_fn.teacher_probs(teacher, 0.07), masks).item(),
        expected, rel_tol=1e-5,
    )  # fmt: skip


# ---------------------------------------------------------------------- KoLeo
@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("dim", [3, 8])
def test_koleo_matches_naive_with_gradients(batch, dim):
    torch.manual_seed(batch * dim)
    x = (torch.randn(batch, dim) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    loss = KoLeoLoss()(x)
    expected = naive_koleo(x_ref)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5, abs_tol=1e-6)
    loss.backward()
    expected.backward()
    assert _close(x.grad, x_ref.grad, tol=1e-4)


def test_koleo_mutations_do_not_match():
    """A row that may be its own neighbour, or features left unnormalised, are caught; a
    duplicated row stays finite (eps)."""
    torch.manual_seed(5)
    x = torch.randn(8, 4) * 2
    loss = koleo_loss(x).item()
    assert math.isclose(loss, naive_koleo(x).item(), rel_tol=1e-5)
    assert abs(loss - naive_koleo(x, self_neighbour=True).item()) > 1.0
    assert abs(loss - naive_koleo(x, normalize=False).item()) > 1e-2
    duplicated = torch.cat([x[:3], x[:1]])
    assert math.isclose(koleo_loss(duplicated).item(), naive_koleo(duplicated).item(), rel_tol=1e-5)
    assert math.isfinite(koleo_loss(duplicated).item())


# ---------------------------------------------------------------------- Gram anchoring
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("neg", ["keep", "remove", "teacher"])
@pytest.mark.parametrize("shape", [(1, 4, 3), (3, 5, 6)])
def test_gram_matches_naive(normalize, img_level, neg, shape):
    torch.manual_seed(sum(shape))
    s = torch.randn(shape, requires_grad=True)
    t = torch.randn(shape)
    loss_fn = GramLoss(
        normalize, img_level, remove_neg=neg == "remove", remove_only_teacher_neg=neg == "teacher"
    )
    loss = loss_fn(s, t)
    expected = naive_gram(s.detach(), t, normalize, img_level, neg)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5, abs_tol=1e-7)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_gram_mutations_do_not_match():
    """A Gram over the whole batch instead of per image, unnormalised features, or the
    negatives handled by the other rule: each is caught."""
    torch.manual_seed(6)
    s, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    per_image = gram_loss(s, t).item()
    assert math.isclose(per_image, naive_gram(s, t), rel_tol=1e-5)
    for wrong in (naive_gram(s, t, img_level=False), naive_gram(s, t, normalize=False)):
        assert abs(per_image - wrong) > 1e-3 * wrong
    teacher_only = gram_loss(s, t, remove_only_teacher_neg=True).item()
    assert math.isclose(teacher_only, naive_gram(s, t, neg="teacher"), rel_tol=1e-5)
    assert abs(teacher_only - naive_gram(s, t, neg="remove")) > 1e-4
    with pytest.raises(ValueError, match="exclusive"):
        gram_loss(s, t, remove_neg=True, remove_only_teacher_neg=True)


def test_gram_weight_schedule():
    assert [gram_weight(s, 10, 4, 2.0) for s in (0, 9, 10)] == [0.0, 0.0, 0.0]
    assert math.isclose(gram_weight(12, 10, 4, 2.0), 1.0)  # half way up the half cosine
    assert gram_weight(11, 10, 4, 2.0) < 0.5 < gram_weight(13, 10, 4, 2.0) < 2.0
    assert [gram_weight(s, 10, 4, 2.0) for s in (14, 10**7)] == [2.0, 2.0]
    assert [gram_weight(s, 10, 0, 2.0) for s in (9, 10)] == [0.0, 2.0]


@pytest.mark.parametrize(
    "first,every,max_updates", [(0, 5, None), (7, 5, None), (20, 10, 3), (3, 1, 4)]
)
def test_gram_refresh_matches_dinov3_loop(first, every, max_updates):
    """The refreshes equal dinov3's training loop (a counter that lives through the run),
    and the count at any step, for a resume, needs no counter."""
    count = 0
    for step in range(120):
        assert gram_refreshes_before(step, first, every, max_updates) == count, step
        due = (
            (step + 1) >= first
            and (step + 1) % every == 0
            and (max_updates is None or count < max_updates)
        )
        assert gram_refresh_due(step, first, every, max_updates) == due, step
        count += due
    wrong = [s for s in range(120) if (s + 1) >= first and (s + 1) % (every + 1) == 0]  # mutation
    assert wrong != [s for s in range(120) if gram_refresh_due(s, first, every, None)]


# ---------------------------------------------------------------------- distributed (gloo)
# rank r holds rows SPLITS[world][r] of the global batch; iBOT-style buffers hold VALID[world][r]
# valid (masked) rows at the front of PAD rows
SPLITS = {2: (5, 7), 3: (3, 4, 5)}
VALID = {2: (2, 5), 3: (1, 6, 3)}
PAD, K, KOLEO_B, KOLEO_D = 6, 7, 4, 5


def _data(world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(world)
    return {
        "logits": torch.randn(sum(SPLITS[world]), K, generator=g),
        "padded": torch.randn(world, PAD, K, generator=g),
        "koleo": torch.randn(world * KOLEO_B, KOLEO_D, generator=g),
    }


def _valid(world: int) -> torch.Tensor:
    return torch.arange(PAD)[None, :] < torch.tensor(VALID[world])[:, None]  # (world, PAD)


def _run_group(rank: int, world: int, group: dist.ProcessGroup, out_dir: str) -> None:
    def reduce(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        # differentiable, so each distance's gradient reaches the rank owning the neighbour
        import torch.distributed.nn.functional as dnf

        with warnings.catch_warnings():  # deprecated in favour of a private API; still works
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(dnf.all_gather(x, group=group)), rank * x.shape[0]

    data, valid = _data(world), _valid(world)
    start = sum(SPLITS[world][:rank])
    mine = data["logits"][start : start + SPLITS[world][rank]]
    center = torch.full((1, K), 0.5)
    ema_center_update(center, data["padded"][rank], 0.9, reduce, valid=valid[rank])
    x = data["koleo"][rank * KOLEO_B : (rank + 1) * KOLEO_B].clone().requires_grad_()
    koleo = koleo_loss(x, all_gather=gather)
    koleo.backward()
    torch.save({
        "sk": sinkhorn_knopp(mine, 0.05, 3, reduce),
        "sk_valid": sinkhorn_knopp(data["padded"][rank], 0.05, 3, reduce, valid=valid[rank]),
        "center": center, "koleo": koleo.detach(), "koleo_grad": x.grad,
    }, os.path.join(out_dir, f"w{world}_r{rank}.pt"))  # fmt: skip


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        _run_group(rank, 3, dist.group.WORLD, out_dir)
        if rank < 2:
            _run_group(rank, 2, pair, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the results are on disk: skip the interpreter's teardown of torch (seconds of a spawned
    # child's life on a busy 2-core machine); an exception above still reaches mp.spawn
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ~8 s on 2 idle cores (estimated: 13.5 s of CPU, three torch imports); 14-23 s at load 6-7
@pytest.mark.budget(60)
def test_distributed_sinkhorn_center_and_koleo_equal_one_process():
    """Ranks holding different numbers of rows (and of valid rows) on 2 and 3 gloo processes
    (one launch of 3; the 2-rank group is a sub-group) give what one process gets from the
    whole batch: the Sinkhorn-Knopp rows, the EMA center, and for KoLeo the mean loss and,
    through the differentiable gather, the gradients (times the world size, as DDP averages)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(_free_port(), d), nprocs=3)
        results = {
            w: [torch.load(os.path.join(d, f"w{w}_r{r}.pt")) for r in range(w)] for w in (2, 3)
        }
    for world, ranks in results.items():
        data, valid = _data(world), _valid(world)
        whole = sinkhorn_knopp(data["logits"], 0.05, 3)
        assert _close(torch.cat([r["sk"] for r in ranks]), whole), world
        assert _close(whole, naive_sinkhorn(data["logits"], 0.05, 3)), world
        compact = data["padded"][valid]  # the valid rows of all ranks, in rank order
        got = torch.cat([r["sk_valid"][valid[i]] for i, r in enumerate(ranks)])
        assert _close(got, sinkhorn_knopp(compact, 0.05, 3)), world
        assert all(torch.count_nonzero(r["sk_valid"][~valid[i]]) == 0 for i, r in enumerate(ranks))
        expected_center = 0.9 * 0.5 + 0.1 * compact.mean(0, keepdim=True)
        assert all(_close(r["center"], expected_center, tol=1e-6) for r in ranks), world
        x = data["koleo"].clone().requires_grad_()
        single = koleo_loss(x)
        single.backward()
        assert math.isclose(
            sum(r["koleo"].item() for r in ranks) / world, single.item(), rel_tol=1e-5
        )
        grads = torch.cat([r["koleo_grad"] for r in ranks]) / world
        assert _close(grads, x.grad, tol=1e-5), world
