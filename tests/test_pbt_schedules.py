"""Schedules whose values change at a global step (``dino_core.schedules.splice_schedules``,
``train.value_changes``): a value changed at step ``s`` continues as a fresh schedule of the
new value would be at ``s``, checked against the naive formulas written here, and in the
real loop (in process, no Ray) step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_train_loop import TINY, LossRecorder

from dino_core.schedules import build_schedules, splice_schedules
from dino_core.specs import ScheduleSpec
from service.config import ConfigError, load_config
from service.train.context import InProcessContext
from service.train.loop import Loop

# the tests of plain numbers and files: well under 0.1 s each; the loop's mark their own
pytestmark = pytest.mark.budget(5)
EPOCHS, NITER, BATCH = 6, 5, 512
TOTAL = EPOCHS * NITER
BASE = ScheduleSpec(lr=1e-3, min_lr=1e-5, warmup_epochs=2, weight_decay=0.04,
                    weight_decay_end=0.4, momentum_teacher=0.99, warmup_teacher_temp=0.02,
                    teacher_temp=0.04, warmup_teacher_temp_epochs=3)


# ---- the paper's formulas, one step at a time ----------------------------------------
def naive_teacher_temp(s: ScheduleSpec, t: int) -> float:
    """Linear per epoch from warmup_teacher_temp (epoch 0) to teacher_temp (its last
    warm-up epoch), then constant."""
    epoch, w = t // NITER, s.warmup_teacher_temp_epochs
    if epoch >= w:
        return s.teacher_temp
    return s.warmup_teacher_temp + (s.teacher_temp - s.warmup_teacher_temp) * epoch / (w - 1)


def naive_momentum(s: ScheduleSpec, t: int) -> float:
    """Cosine from momentum_teacher at step 0 to 1 at the end of the run."""
    return 1 + 0.5 * (s.momentum_teacher - 1) * (1 + math.cos(math.pi * t / TOTAL))


def naive_lr(s: ScheduleSpec, t: int) -> float:
    """Linear warm-up from 0 to lr x batch / 256 (end point included), then cosine to min_lr."""
    peak, w = s.lr * BATCH / 256, s.warmup_epochs * NITER
    if t < w:
        return peak * t / (w - 1)
    return s.min_lr + 0.5 * (peak - s.min_lr) * (1 + math.cos(math.pi * (t - w) / (TOTAL - w)))


def naive_weight_decay(s: ScheduleSpec, t: int) -> float:
    return s.weight_decay_end + 0.5 * (s.weight_decay - s.weight_decay_end) * (
        1 + math.cos(math.pi * t / TOTAL))


NAIVE = {"teacher_temp": naive_teacher_temp, "momentum": naive_momentum, "lr": naive_lr,
         "weight_decay": naive_weight_decay}
CHANGES = {"teacher_temp": {"teacher_temp": 0.06}, "momentum": {"momentum_teacher": 0.996},
           "lr": {"lr": 3e-3}, "weight_decay": {"weight_decay": 0.1}}


def _schedules(spec: ScheduleSpec):
    return build_schedules(spec, epochs=EPOCHS, niter_per_ep=NITER, global_batch_size=BATCH)


def _piecewise(name: str, segments: list[tuple[int, ScheduleSpec]], restart: bool = False):
    """The naive per-step values: segment k's formula at the global step (``restart``: at
    the step counted from the segment's start, the mutation a test must catch)."""
    out = []
    for t in range(TOTAL):
        start, spec = max((seg for seg in segments if seg[0] <= t), key=lambda seg: seg[0])
        out.append(NAIVE[name](spec, t - start if restart else t))
    return np.array(out)


def test_the_naive_formulas_are_the_schedules():
    s = _schedules(BASE)
    for name, values in NAIVE.items():
        assert np.allclose(getattr(s, name), [values(BASE, t) for t in range(TOTAL)],
                           rtol=1e-12, atol=1e-15), name


# 7: inside the lr warm-up (2 epochs) and the teacher temperature's (3 of 6 epochs);
# 22: after both
@pytest.mark.parametrize("step", [7, 22])
@pytest.mark.parametrize("name", list(NAIVE))
def test_a_value_changed_at_a_step_continues_as_a_fresh_schedule_from_there(name, step):
    new = ScheduleSpec(**{**BASE.__dict__, **CHANGES[name]})
    spliced = splice_schedules([(0, _schedules(BASE)), (step, _schedules(new))])
    got = getattr(spliced, name)
    expected = _piecewise(name, [(0, BASE), (step, new)])
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert np.array_equal(got[:step], getattr(_schedules(BASE), name)[:step])
    assert np.array_equal(got[step:], getattr(_schedules(new), name)[step:])
    # the test has teeth: a new schedule restarted at step `step` (warm-up or cosine from its
    # beginning) differs from the expected values
    restarted = _piecewise(name, [(0, BASE), (step, new)], restart=True)
    assert not np.allclose(restarted, expected, rtol=1e-6, atol=0)
    # and the other schedules do not move
    for other in set(NAIVE) - {name}:
        assert np.array_equal(getattr(spliced, other), getattr(_schedules(BASE), other))


def test_several_changes_each_from_its_own_step():
    specs = [BASE, ScheduleSpec(**{**BASE.__dict__, "teacher_temp": 0.06, "momentum_teacher": 0.996}),
             ScheduleSpec(**{**BASE.__dict__, "teacher_temp": 0.05, "momentum_teacher": 0.996,
                             "lr": 2e-3})]
    segments = list(zip([0, 8, 19], specs))
    spliced = splice_schedules([(start, _schedules(s)) for start, s in segments])
    for name in NAIVE:
        assert np.allclose(getattr(spliced, name), _piecewise(name, segments), rtol=1e-12,
                           atol=1e-15), name
    assert spliced.niter_per_ep == NITER and len(spliced.lr) == TOTAL
    # a change past the end of the run changes nothing
    late = splice_schedules([(0, _schedules(BASE)), (TOTAL + 5, _schedules(specs[1]))])
    assert np.array_equal(late.teacher_temp, _schedules(BASE).teacher_temp)


def test_splice_refuses_what_is_not_one_run():
    a = _schedules(BASE)
    other = build_schedules(BASE, epochs=EPOCHS + 1, niter_per_ep=NITER, global_batch_size=BATCH)
    with pytest.raises(ValueError, match="starts at step 0"):
        splice_schedules([(3, a)])
    with pytest.raises(ValueError, match="increase strictly"):
        splice_schedules([(0, a), (5, a), (5, a)])
    with pytest.raises(ValueError, match="same run"):
        splice_schedules([(0, a), (5, other)])


# ---- the config setting --------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ("[{step: 0, values: {loss.teacher_temp: 0.05}}]",
     "train.value_changes.0.step: Input should be greater than or equal to 1"),
    ("[{step: 5, values: {loss.teacher_temp: 0.05}}, {step: 5, values: {optim.lr: 0.001}}]",
     "train.value_changes: steps must increase strictly, got [5, 5]"),
    ("[{step: 5, values: {model.out_dim: 128}}]",
     "train.value_changes.0.values: model.out_dim cannot change mid-run (not a schedule "
     "setting); allowed: optim.lr, "),
    ("[{step: 5, values: {loss.teacher_temp: hot}}]",
     "train.value_changes.0.values.loss.teacher_temp: a number, got 'hot'"),
    ("[{step: 5, values: {loss.teacher_temp: 1.5}}]",
     "train.value_changes.0 (step 5): loss.teacher_temp=1.5 is not valid: Input should be "
     "less than or equal to 1"),
    ("[{step: 5, values: {loss.teacher_temp: 0.05}}, {step: 9, values: {optim.momentum_teacher: 1}}]",
     "train.value_changes.1 (step 9): optim.momentum_teacher=1 is not valid: Input should be "
     "less than 1"),
])
def test_value_changes_are_checked_naming_the_setting(changes, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, None, [f"train.value_changes={changes}"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith(message), str(err.value)


def test_no_value_changes_is_the_plain_schedule():
    cfg = load_config(None, None, [])
    assert cfg.train.value_changes == []
    ok = load_config(None, None, ["train.value_changes=[{step: 3, values: {optim.warmup_epochs: 2, "
                                  "loss.teacher_temp: 0.05}}]"])
    assert ok.train.value_changes[0].values == {"optim.warmup_epochs": 2, "loss.teacher_temp": 0.05}
    assert isinstance(ok.train.value_changes[0].values["optim.warmup_epochs"], int)


# ---- the real loop -------------------------------------------------------------------
def per_step(tracker: LossRecorder, key: str) -> dict[int, float]:
    """``{global step: value used by that step}``: a step's metrics are logged under the
    count of steps done, one more than its own index."""
    return {step - 1: m[key] for step, m in tracker.metrics if key in m and "loss" in m}


@pytest.mark.budget(15)  # 18 in-process steps of a tiny ViT: 0.6-1.8 s here (2026-12-04)
def test_the_loop_trains_with_the_changed_values_step_by_step(tmp_path, one_torch_thread):
    changes = ("[{step: 4, values: {loss.teacher_temp: 0.06, optim.momentum_teacher: 0.99}}, "
               "{step: 11, values: {loss.teacher_temp: 0.05}}]")
    cfg = load_config(None, None, [*TINY, "train.epochs=3", "loss.warmup_teacher_temp=0.02",
                                   "loss.warmup_teacher_temp_epochs=3", "loss.teacher_temp=0.04",
                                   "optim.momentum_teacher=0.996", f"storage.root={tmp_path}",
                                   "run_name=changes", f"train.value_changes={changes}"])
    run_url = str(tmp_path / "changes")
    tracker = LossRecorder()
    loop = Loop(cfg, InProcessContext(run_url, cfg.train.keep_last), run_url, tracker)
    assert loop.state.niter_per_ep == 6
    loop.run()
    total = 18
    temps, moms = per_step(tracker, "teacher_temp"), per_step(tracker, "momentum")
    assert sorted(temps) == sorted(moms) == list(range(total))

    def teacher_temp(t: int) -> float:  # the naive formula, with the segment's value
        temp = 0.04 if t < 4 else 0.06 if t < 11 else 0.05
        epoch = t // 6
        return 0.02 + (temp - 0.02) * epoch / 2

    def momentum(t: int) -> float:
        m = 0.996 if t < 4 else 0.99
        return 1 + 0.5 * (m - 1) * (1 + math.cos(math.pi * t / total))

    assert [temps[t] for t in range(total)] == pytest.approx(
        [teacher_temp(t) for t in range(total)], rel=1e-12)
    assert [moms[t] for t in range(total)] == pytest.approx(
        [momentum(t) for t in range(total)], rel=1e-12)
    assert temps[10] == pytest.approx(0.04) and temps[11] == pytest.approx(0.035)
