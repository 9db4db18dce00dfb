"""The DINO loss, center and one full optimizer step against a naive loop of the paper's
formula (Caron et al. 2021, Eq. 1-4, Algorithm 1)."""

import copy
import math

import pytest
import torch

from dino_core import (
    DINOLoss,
    NetworkSpec,
    StepConfig,
    build_networks,
    build_optimizer,
    ema_parameter_lists,
    train_step,
)


def naive_dino_loss(student_out, teacher_out, center, t_s, t_t, n_global, n_crops):
    """Loop over (teacher view, student view) pairs and samples, softmax written out (shifted
    by the max, the textbook way to keep exp(x / 0.04) finite in fp32)."""
    b = teacher_out.shape[0] // n_global
    total, n_terms = 0.0, 0
    for iq in range(n_global):
        for v in range(n_crops):
            if v == iq:
                continue
            pair = 0.0
            for i in range(b):
                t = teacher_out[iq * b + i]
                s = student_out[v * b + i]
                zt = (t - center[0]) / t_t
                pt = torch.exp(zt - zt.max())
                pt = pt / pt.sum()
                zs = s / t_s
                log_ps = zs - zs.max() - torch.log(torch.exp(zs - zs.max()).sum())
                pair = pair + (-(pt * log_ps).sum())
            total = total + pair / b
            n_terms += 1
    return total / n_terms


def naive_center(center, teacher_out, m):
    return center * m + (1 - m) * teacher_out.mean(dim=0, keepdim=True)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("n_local", [0, 2, 10])
@pytest.mark.parametrize("k", [8, 256])
@pytest.mark.parametrize("temps", [(0.1, 0.04), (0.2, 0.07)])
def test_loss_and_center_match_naive(batch, n_local, k, temps):
    torch.manual_seed(0)
    t_s, t_t = temps
    n_crops = 2 + n_local
    student = torch.randn(n_crops * batch, k, dtype=torch.float64).float()
    teacher = torch.randn(2 * batch, k)
    loss_fn = DINOLoss(k, student_temp=t_s, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k) * 0.1)
    center0 = loss_fn.center.clone()

    loss = loss_fn(student, teacher, t_t)
    expected = naive_dino_loss(student, teacher, center0, t_s, t_t, 2, n_crops)
    assert abs(loss.item() - float(expected)) <= 1e-5 * max(1.0, abs(float(expected)))
    assert torch.allclose(loss_fn.center, naive_center(center0, teacher, 0.9), atol=1e-6, rtol=0)


def test_loss_has_no_gradient_through_teacher():
    student = torch.randn(8, 16, requires_grad=True)
    teacher = torch.randn(4, 16, requires_grad=True)
    DINOLoss(16)(student, teacher, 0.04).backward()
    assert teacher.grad is None and student.grad is not None


def test_same_view_pairs_are_excluded():
    """If the student matched the teacher exactly on its own view only, that pair must not
    count: with 2 crops the loss is the cross pairs alone."""
    k = 4
    t = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0]])
    s = t.clone() * 0.04 / 0.1  # student distribution equal to the teacher's, view by view
    loss = DINOLoss(k)(s, t, 0.04)
    same = DINOLoss(k)(torch.cat([s[1:], s[:1]]), t, 0.04)
    assert loss.item() > 5 * same.item()


def _naive_step(student, teacher, crops, values, center, clip, freeze, t_s=0.1):
    """The reference algorithm with plain loops: host-synced per-parameter clipping,
    Python-loop EMA."""
    opt = torch.optim.AdamW(
        [
            {
                "params": [
                    p
                    for n, p in student.named_parameters()
                    if p.ndim > 1 and not n.endswith(".bias") and p.requires_grad
                ]
            },
            {
                "params": [
                    p
                    for n, p in student.named_parameters()
                    if (p.ndim <= 1 or n.endswith(".bias")) and p.requires_grad
                ],
                "weight_decay": 0.0,
            },
        ],
        lr=values["lr"],
        weight_decay=values["weight_decay"],
    )
    n_crops = len(crops)
    with torch.no_grad():
        t_out = teacher(crops[:2])
    s_out = student(crops)
    loss = naive_dino_loss(s_out, t_out, center, t_s, values["teacher_temp"], 2, n_crops)
    loss.backward()
    for p in student.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2).item()
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)
    if freeze:
        for n, p in student.named_parameters():
            if "last_layer" in n:
                p.grad = None
    opt.step()
    m = values["momentum"]
    with torch.no_grad():
        for pt, ps in zip(teacher.parameters(), student.parameters()):
            pt.data.mul_(m).add_((1 - m) * ps.detach().data)
    return loss, t_out


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_local", [0, 2, 10])
@pytest.mark.parametrize("k", [64, 300])
@pytest.mark.parametrize("freeze", [False, True])
def test_one_step_matches_naive(batch, n_local, k, freeze):
    torch.manual_seed(1)
    spec = NetworkSpec(
        arch="vit_tiny",
        patch_size=8,
        img_size=16,
        depth=2,
        out_dim=k,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
        drop_path_rate=0.0,
    )
    # float64 networks and crops: Adam's first step is lr * g / (|g| + eps), so in fp32 the
    # rounding differences of the two summation orders in gradients near eps became lr-sized
    # errors (seen: 1.2e-5 against the 1e-5 tolerance, 2 threads). In float64 (the loss still
    # takes its softmax in fp32) the largest parameter difference seen is 8e-7.
    student, teacher = (net.double() for net in build_networks(spec))
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    crops = [torch.randn(batch, 3, 16, 16, dtype=torch.float64) for _ in range(2)] + [
        torch.randn(batch, 3, 8, 8, dtype=torch.float64) for _ in range(n_local)
    ]
    values = {"lr": 5e-4, "weight_decay": 0.04, "momentum": 0.99, "teacher_temp": 0.04}
    loss_fn = DINOLoss(k).double()
    loss_fn.center.copy_(torch.randn(1, k) * 0.01)
    center0 = loss_fn.center.clone()
    # a clip small enough that it really changes gradients
    out = train_step(
        student=student,
        teacher=teacher,
        loss_fn=loss_fn,
        optimizer=build_optimizer(student),
        crops=crops,
        values=values,
        step=0,
        freeze_last_layer=freeze,
        ema_params=ema_parameter_lists(teacher, student),
        cfg=StepConfig(clip_grad=0.05),
    )
    ref_loss, ref_t_out = _naive_step(
        ref_student, ref_teacher, crops, values, center0, 0.05, freeze
    )
    assert math.isclose(out.loss, ref_loss.item(), rel_tol=0, abs_tol=1e-5)
    for (n, p), q in zip(student.named_parameters(), ref_student.parameters()):
        assert (p - q).abs().max().item() <= 1e-5, n
    for (n, p), q in zip(teacher.named_parameters(), ref_teacher.parameters()):
        assert (p - q).abs().max().item() <= 1e-5, n
    assert torch.allclose(loss_fn.center, naive_center(center0, ref_t_out, 0.9), atol=1e-6, rtol=0)


def test_nonfinite_loss_raises_before_anything_changes():
    from dino_core import NonFiniteLossError

    torch.manual_seed(0)
    spec = NetworkSpec(arch="vit_tiny", patch_size=8, img_size=16, depth=1, out_dim=32,
                       head_hidden_dim=16, head_bottleneck_dim=8)
    student, teacher = build_networks(spec)
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss_fn = DINOLoss(32)
    opt = build_optimizer(student)
    crops = [torch.randn(2, 3, 16, 16), torch.full((2, 3, 16, 16), float("nan"))]
    values = {"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.99, "teacher_temp": 0.04}
    with pytest.raises(NonFiniteLossError, match="non-finite DINO loss nan at global step 7"):
        train_step(student=student, teacher=teacher, loss_fn=loss_fn, optimizer=opt,
                   crops=crops, values=values, step=7, freeze_last_layer=False,
                   ema_params=ema_parameter_lists(teacher, student), cfg=StepConfig())
    assert all(torch.equal(v, before_s[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())
    assert torch.count_nonzero(loss_fn.center) == 0  # the center did not move
    assert not opt.state  # no optimizer step was taken


def test_deferred_nonfinite_check_skips_the_step_on_the_device():
    """With ``defer_nonfinite_check`` a NaN step changes nothing (parameters, teacher, center,
    AdamW moments and step count) and reports ``finite`` False; a finite step afterwards
    matches the same step taken in the synchronous mode."""
    torch.manual_seed(0)
    spec = NetworkSpec(arch="vit_tiny", patch_size=8, img_size=16, depth=1, out_dim=32,
                       head_hidden_dim=16, head_bottleneck_dim=8, drop_path_rate=0.0)
    student, teacher = build_networks(spec)
    sync_student, sync_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    loss_fn, sync_loss_fn = DINOLoss(32), DINOLoss(32)
    opt = build_optimizer(student, fused=True)
    sync_opt = build_optimizer(sync_student, fused=True)
    values = {"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.99, "teacher_temp": 0.04}
    good = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    bad = [good[0], torch.full((2, 3, 16, 16), float("nan"))]

    def step(s, t, lf, o, crops, defer):
        return train_step(student=s, teacher=t, loss_fn=lf, optimizer=o, crops=crops,
                          values=values, step=0, freeze_last_layer=False,
                          ema_params=ema_parameter_lists(t, s),
                          cfg=StepConfig(defer_nonfinite_check=defer))

    out = step(student, teacher, loss_fn, opt, good, True)
    sync_out = step(sync_student, sync_teacher, sync_loss_fn, sync_opt, good, False)
    assert bool(out.finite) and math.isclose(out.loss, sync_out.loss, rel_tol=1e-6)
    for a, b in ((student, sync_student), (teacher, sync_teacher)):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-7, rtol=0)
    assert torch.allclose(loss_fn.center, sync_loss_fn.center, atol=1e-7, rtol=0)

    before = copy.deepcopy((student.state_dict(), teacher.state_dict(), opt.state_dict()))
    center = loss_fn.center.clone()
    out = step(student, teacher, loss_fn, opt, bad, True)
    assert not bool(out.finite) and math.isnan(out.loss)
    for now, then in zip((student.state_dict(), teacher.state_dict()), before[:2]):
        assert all(torch.equal(v, then[k]) for k, v in now.items())
    for i, st in opt.state_dict()["state"].items():
        assert all(torch.equal(v, before[2]["state"][i][k]) for k, v in st.items())
    assert torch.equal(loss_fn.center, center)

    # the run goes on: the next finite step updates again
    out = step(student, teacher, loss_fn, opt, good, True)
    assert bool(out.finite)
    assert not all(torch.equal(v, before[0][k]) for k, v in student.state_dict().items())
    assert int(opt.state_dict()["state"][0]["step"]) == 2


def test_deferred_check_needs_a_fused_optimizer():
    torch.manual_seed(0)
    spec = NetworkSpec(arch="vit_tiny", patch_size=8, img_size=16, depth=1, out_dim=8,
                       head_hidden_dim=8, head_bottleneck_dim=8)
    student, teacher = build_networks(spec)
    values = {"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.99, "teacher_temp": 0.04}
    with pytest.raises(ValueError, match="fused optimizer"):
        train_step(student=student, teacher=teacher, loss_fn=DINOLoss(8),
                   optimizer=build_optimizer(student, fused=False),
                   crops=[torch.randn(2, 3, 16, 16)] * 2, values=values, step=0,
                   freeze_last_layer=False, ema_params=ema_parameter_lists(teacher, student),
                   cfg=StepConfig(defer_nonfinite_check=True))
