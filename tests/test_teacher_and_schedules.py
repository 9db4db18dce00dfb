"""EMA teacher, schedules, clipping, last-layer freezing and the head's fixed norm."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dino_core import (
    DINOHead,
    build_optimizer,
    build_schedules,
    cancel_last_layer_gradients,
    clip_gradients,
    cosine_schedule,
    ema_update,
)
from dino_core.optim import param_groups
from dino_core.schedules import scaled_lr, teacher_temp_schedule


def test_ema_is_convex_combination():
    t = [torch.full((3,), 2.0), torch.full((2, 2), -1.0)]
    s = [torch.full((3,), 4.0), torch.full((2, 2), 3.0)]
    ema_update(t, s, 0.75)
    assert torch.allclose(t[0], torch.full((3,), 0.75 * 2 + 0.25 * 4))
    assert torch.allclose(t[1], torch.full((2, 2), 0.75 * -1 + 0.25 * 3))
    assert torch.equal(s[0], torch.full((3,), 4.0))  # student untouched


def test_ema_momentum_one_freezes_teacher():
    t, s = [torch.ones(4)], [torch.zeros(4)]
    ema_update(t, s, 1.0)
    assert torch.equal(t[0], torch.ones(4))


def test_cosine_schedule_endpoints_and_warmup():
    sched = cosine_schedule(1.0, 0.1, epochs=10, niter_per_ep=5, warmup_epochs=2)
    assert len(sched) == 50
    warm = sched[:10]
    # linear from 0 to base, end point included (the reference's np.linspace)
    assert warm[0] == 0.0 and warm[-1] == 1.0 and np.allclose(np.diff(warm), 1 / 9)
    assert sched[10] == pytest.approx(1.0)  # cosine starts at the base value
    # and ends one cosine step short of the final value, like the reference's schedule
    assert sched[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 39 / 40)), abs=1e-12)
    assert sched[-1] == pytest.approx(0.1, abs=2e-3)
    assert np.all(np.diff(sched[10:]) <= 0)  # monotone decay
    mid = sched[10 + 20]  # halfway through the cosine part
    assert mid == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 0.5)), abs=1e-9)


def test_a_warmup_without_its_end_point_stops_one_step_short():
    s = cosine_schedule(1.0, 0.0, epochs=3, niter_per_ep=4, warmup_epochs=1,
                        warmup_includes_end=False)
    assert np.allclose(s[:4], [0.0, 0.25, 0.5, 0.75]) and s[4] == 1.0
    default = cosine_schedule(1.0, 0.0, epochs=3, niter_per_ep=4, warmup_epochs=1)
    assert np.allclose(default[:4], [0.0, 1 / 3, 2 / 3, 1.0]) and np.array_equal(s[4:], default[4:])


def test_paper_schedules():
    s = build_schedules(
        epochs=100,
        niter_per_ep=10,
        global_batch_size=1024,
        lr=5e-4,
        min_lr=1e-6,
        warmup_epochs=10,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
    )
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    assert s.lr.max() == pytest.approx(2e-3)
    # the warm-up's last step (99) reaches the peak and the cosine starts there (100)
    assert s.lr[99] == pytest.approx(2e-3) and s.lr[100] == pytest.approx(2e-3)
    assert np.argmax(s.lr) in (99, 100) and s.lr[98] < s.lr[99]
    assert s.lr[-1] == pytest.approx(1e-6, rel=1e-2)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(
        0.4, abs=1e-4
    )
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(s.momentum) >= 0)
    # teacher temperature: per-epoch linear warm-up 0.04 -> 0.07 over 30 epochs, then flat
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert np.all(s.teacher_temp[:10] == s.teacher_temp[0])  # constant within an epoch
    assert s.teacher_temp[29 * 10] == pytest.approx(0.07)
    assert np.all(s.teacher_temp[300:] == pytest.approx(0.07))
    assert s.at(10**9)["lr"] == s.lr[-1]  # indexing past the end clamps


def _reference_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                                start_warmup_value=0):
    """A transcription of the reference DINO ``utils.cosine_scheduler``."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@pytest.mark.parametrize("args", [
    (5e-4 * 1024 / 256, 1e-6, 100, 37, 10), (0.04, 0.4, 3, 5), (0.996, 1.0, 7, 11),
    (1.0, 0.1, 10, 5, 2, 0.25), (2.0, 0.0, 2, 3, 1), (1.0, 0.0, 1, 1),
])  # fmt: skip
def test_cosine_schedule_equals_the_reference_cosine_scheduler(args):
    assert np.array_equal(cosine_schedule(*args), _reference_cosine_scheduler(*args))


def test_teacher_temp_without_warmup_is_constant():
    assert np.all(teacher_temp_schedule(0.04, 0.04, 0, 3, 2) == 0.04)


def test_param_groups_exclude_biases_and_norms_from_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_clip_caps_each_parameter_separately():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    model = nn.Module()
    model.a, model.b = a, b
    a.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5 -> scaled to norm 1
    b.grad = torch.tensor([0.3, 0.4, 0.0, 0.0])  # norm 0.5 -> untouched
    norms = clip_gradients(model, 1.0)
    assert torch.allclose(norms, torch.tensor([5.0, 0.5]))
    assert a.grad.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8, 0, 0]), atol=1e-6)
    assert torch.equal(b.grad, torch.tensor([0.3, 0.4, 0.0, 0.0]))


def test_cancel_last_layer_gradients_only_touches_last_layer():
    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    head(torch.randn(2, 8)).sum().backward()
    cancel_last_layer_gradients(head)
    for name, p in head.named_parameters():
        if "last_layer" in name:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name


def test_head_shapes_and_fixed_unit_norm():
    head = DINOHead(384, 1000, hidden_dim=2048, bottleneck_dim=256, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (384, 2048),
        (2048, 2048),
        (2048, 256),
    ]
    assert any(isinstance(m, nn.GELU) for m in head.mlp)
    assert head.last_layer.bias is None
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad
    opt = build_optimizer(head)
    for _ in range(3):
        opt.zero_grad()
        (head(torch.randn(4, 384)) ** 2).mean().backward()
        for group in opt.param_groups:
            group["lr"] = 0.1
        opt.step()
    # every prototype keeps unit norm after updates
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(1000), atol=1e-5)


def test_head_last_layer_norm_trainable_when_not_fixed():
    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False, use_bn=True)
    assert head.last_layer.parametrizations.weight.original0.requires_grad
    assert any(isinstance(m, nn.BatchNorm1d) for m in head.mlp)


def test_head_bottleneck_is_l2_normalised():
    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(5, 8)
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(head(x), z @ head.last_layer.weight.T, atol=1e-6)
