"""``bench/reference_step.py`` is the baseline of every ratio of the step benchmark, so each
lever must change how the step is computed, never what it computes: from the same weights
and crops, in float64 on CPU, a step with any one lever on ends where the reference
semantics end, and the project's step (``bench/step.py``'s ``dino_core``) where the ladder's
top rung ends. The project's loss computes in fp32 by design, so it is held to fp32
precision against the reference's pair loop."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "bench" / "step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module, sys.modules["reference_step"]  # the one step.py imported


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run(make, template, crops) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``STEPS`` steps of ``make(student, teacher)`` from copies of ``template``; returns the
    student's and the teacher's parameters and the center."""
    student, teacher = (copy.deepcopy(m) for m in template)
    step = make(student, teacher)
    for _ in range(STEPS):
        step(crops)
    center = step.loss_fn.center if hasattr(step, "loss_fn") else step.center
    return flat(step.student), flat(step.teacher), center.detach().clone()


def test_every_lever_computes_the_reference_step(bench, one_torch_thread):
    step_mod, ref = bench
    from dino_core import ema_parameter_lists

    s = step_mod.SETTINGS["small"]
    cpu = torch.device("cpu")
    template = tuple(m.double() for m in step_mod.networks(s, drop_path=0.0))
    crops = [c[:2].double() for c in step_mod.synthetic_crops(s, 2, cpu)]

    def lever(levers):
        return lambda st, te: ref.LeverStep(st, te, ema_parameter_lists(te, st), s.out_dim,
                                            levers, cpu)

    start = (flat(template[0]), flat(template[1]))
    reference = run(lever(ref.Levers()), template, crops)
    moved = [float((reference[i] - start[i]).norm()) for i in (0, 1)]
    assert min(moved) > 0  # the steps did train

    def distance(a, b) -> list[float]:
        """Of student and teacher: how far apart, relative to how far the reference moved."""
        return [float((a[i] - b[i]).norm()) / moved[i] for i in (0, 1)]

    for levers in (ref.Levers(sdpa=True), ref.Levers(fused_adamw=True),
                   ref.Levers(foreach=True), ref.Levers(no_sync=True)):
        got = run(lever(levers), template, crops)
        assert max(distance(got, reference)) < 1e-9, levers
        assert torch.allclose(got[2], reference[2], rtol=1e-12, atol=1e-15)

    # the ladder's top rung (bf16 stays off on CPU, as the benchmark does) and the project's
    # step: the same computation, to float64 rounding
    top = run(lever(ref.Levers(True, False, True, True, True, True)), template, crops)
    ours = run(lambda st, te: step_mod.ProjectStep(st, te, s.out_dim, cpu, set()),
               template, crops)
    assert max(distance(ours, top)) < 1e-9
    # the project's loss computes in fp32: a few fp32 roundings from the reference,
    # amplified by Adam's normalisation (measured: 2e-5 of the update after 2 steps)
    assert max(distance(top, reference)) < 1e-3


def test_reference_loss_is_the_project_loss_to_fp32_precision(bench):
    _, ref = bench
    from dino_core import DINOLoss

    gen = torch.Generator().manual_seed(0)
    k, b, n_crops = 64, 4, 6
    student = torch.randn(n_crops * b, k, dtype=torch.float64, generator=gen,
                          requires_grad=True)
    teacher = torch.randn(2 * b, k, dtype=torch.float64, generator=gen)
    loss_fn = DINOLoss(k).double()
    loss_fn.center.normal_(generator=gen)
    a = ref.reference_loss(student, teacher, loss_fn.center, 0.04, n_crops)
    b_ = loss_fn(student, teacher, 0.04, 2, update_center=False)
    (ga,) = torch.autograd.grad(a, student)
    (gb,) = torch.autograd.grad(b_, student)
    assert float(a.detach()) == pytest.approx(float(b_.detach()), rel=1e-6)
    assert float((ga - gb.double()).norm() / ga.norm()) < 1e-5  # measured: 1.8e-7
