"""The parts of a population-based sweep that need no Ray: PBT's mutations inside the space,
the lineage and a trial's resolved schedule, the exploit's checkpoint copy, the Tune
checkpoint's pointer, a resumed sweep's current values and the ranking (a collapsed trial is
never the best). The sweep itself: test_tune_pbt.py."""

from __future__ import annotations

import json
import random

import pytest
import torch

from service.errors import ConfigError
from service.storage import checkpoints as ckpt
from service.sweep import schedulers
from service.sweep.lineage import LineageRow, append_row, read_rows, schedule_of, write_csv
from service.sweep.pbt import copy_checkpoint, read_pointer, write_pointer
from service.sweep.record import SweepRecord, TrialResult
from service.sweep.results import result_rows
from service.sweep.run import current_values

SPACE = {"loss.teacher_temp": "grid:0.04,0.05,0.07",
         "optim.momentum_teacher": "uniform:0.99,0.996",
         "optim.lr": "loguniform:1e-4,1e-2", "data.path": "choice:a,b",
         "optim.weight_decay": "grid:0.04"}


@pytest.mark.budget(5)
def test_bounds_are_the_numeric_keys_with_a_range():
    assert schedulers.bounds(SPACE) == {"loss.teacher_temp": (0.04, 0.07),
                                        "optim.momentum_teacher": (0.99, 0.996),
                                        "optim.lr": (1e-4, 1e-2)}


@pytest.mark.budget(5)
def test_every_mutation_stays_inside_the_space_and_moves():
    rng = random.Random(0)
    explore = schedulers.explore_within(SPACE, rng)
    config = {"loss.teacher_temp": 0.07, "optim.momentum_teacher": 0.996, "optim.lr": 1e-2,
              "__values__": {"loss.teacher_temp": 0.07, "optim.momentum_teacher": 0.996,
                             "optim.lr": 1e-2, "data.path": "a", "optim.weight_decay": 0.04}}
    for _ in range(300):  # from the upper bounds, where Ray's 1.2 factor would leave them
        before = dict(config["__values__"])
        config = explore(json.loads(json.dumps(config)))
        for key, (lo, hi) in schedulers.bounds(SPACE).items():
            assert lo <= config[key] <= hi, (key, config[key])
            assert config[key] != before[key]
            assert config["__values__"][key] == config[key]
        assert config["__values__"]["optim.weight_decay"] == 0.04  # one value: never mutated


@pytest.mark.budget(5)
def test_a_momentum_is_perturbed_by_its_distance_to_one():
    rng = random.Random(1)
    seen = set()
    for _ in range(50):
        v = schedulers.perturb("optim.momentum_teacher", 0.995, 0.99, 0.996, "grid", rng)
        seen.add(round(v, 6))
    # 1 - 0.005 * 1.2 = 0.994 and 1 - 0.005 * 0.8 = 0.996; resamples land anywhere inside
    assert {0.994, 0.996} <= seen and all(0.99 <= v <= 0.996 for v in seen)


@pytest.mark.budget(5)
def test_a_population_needs_a_range_and_two_trials():
    with pytest.raises(ConfigError, match="no swept key has a numeric range"):
        schedulers.check_population("pbt", {"data.path": "choice:a,b"}, 4)
    with pytest.raises(ConfigError, match="a population of 1 trial"):
        schedulers.check_population("pbt", SPACE, 1)
    schedulers.check_population("asha", {"data.path": "choice:a,b"}, 1)


@pytest.mark.budget(20)
def test_pb2_and_pbt_schedulers_take_the_space_bounds():
    pbt = schedulers.build("pbt", SPACE, 2, 1, seed=0)
    assert pbt._perturbation_interval == 2 and pbt._time_attr == "pbt_epoch"
    assert set(pbt._hyperparam_mutations) == set(schedulers.bounds(SPACE))
    pb2 = schedulers.build("pb2", SPACE, 1, 1)
    assert {k: tuple(v) for k, v in pb2._hyperparam_bounds.items()} == schedulers.bounds(SPACE)
    # PB2 picks its values itself; they become the trial's current ones
    new = {"optim.lr": 5e-3, "loss.teacher_temp": 0.05, "optim.momentum_teacher": 0.992}
    config = {**new, "__values__": {"optim.lr": 1e-3, "loss.teacher_temp": 0.04,
                                    "optim.momentum_teacher": 0.99, "data.path": "a"}}
    assert pb2._custom_explore_fn(config)["__values__"] == {**new, "data.path": "a"}


def rows_of(*rows: tuple) -> list[LineageRow]:
    return [LineageRow(trial=t, step=s, event=e, source=src, values={"x": v})
            for t, s, e, src, v in rows]


@pytest.mark.budget(5)
def test_a_trials_schedule_follows_its_exploits_back_to_their_sources(tmp_path):
    rows = rows_of(("a", 0, "start", "", 1.0), ("b", 0, "start", "", 2.0),
                   ("c", 0, "start", "", 3.0),
                   ("b", 10, "exploit", "a", 1.2),   # b's weights were a's until step 10
                   ("c", 20, "exploit", "b", 1.44),  # c's were b's (so a's) until 20
                   ("a", 30, "exploit", "c", 1.7))
    for r in rows:
        append_row(str(tmp_path), r)
    back = read_rows(str(tmp_path), ["a", "b", "c"])
    assert sorted(back, key=lambda r: (r.trial, r.step)) == sorted(
        rows, key=lambda r: (r.trial, r.step))
    assert schedule_of(back, "b") == [(0, {"x": 1.0}), (10, {"x": 1.2})]
    assert schedule_of(back, "c") == [(0, {"x": 1.0}), (10, {"x": 1.2}), (20, {"x": 1.44})]
    assert schedule_of(back, "a") == [(0, {"x": 1.0}), (10, {"x": 1.2}), (20, {"x": 1.44}),
                                      (30, {"x": 1.7})]
    # before step 15, c's weights were its own: its history up to then is its start
    assert schedule_of(back, "c", until=15) == [(0, {"x": 3.0})]
    with pytest.raises(ConfigError, match="no lineage rows for trial 'zz'"):
        schedule_of(back, "zz")
    text = open(write_csv(str(tmp_path / "l.csv"), back)).read().splitlines()
    assert text[0] == "trial,step,event,source,x" and "b,10,exploit,a,1.2" in text


@pytest.mark.budget(5)
def test_a_forged_lineage_file_is_refused_naming_it(tmp_path):
    (tmp_path / "lineage").mkdir()
    (tmp_path / "lineage" / "a.json").write_text(json.dumps(
        {"rows": [{"trial": "../x", "step": -1, "event": "start", "values": {}}]}))
    with pytest.raises(ConfigError, match=r"a\.json: refused"):
        read_rows(str(tmp_path), ["a"])


@pytest.mark.budget(10)
def test_the_exploit_copy_is_the_targets_newest_checkpoint_byte_for_byte(tmp_path):
    src_run, dst_run = tmp_path / "src", tmp_path / "dst"
    state = {"student": {"w": torch.arange(6.0)}, "epoch": 1, "global_step": 12}
    source = ckpt.write_checkpoint(src_run / "checkpoint_2026-01-01_00-00-00.000000", state,
                                   "a: 1\n")
    ckpt.write_checkpoint(dst_run / "checkpoint_2026-01-01_00-00-01.000000",
                          {**state, "global_step": 18, "student": {"w": torch.zeros(6)}}, "")
    copy = copy_checkpoint(str(source), str(dst_run))
    assert ckpt.resolve(str(dst_run)) == copy  # what the target's run resumes from
    uri, loaded = ckpt.load(str(dst_run))
    assert uri == copy and loaded["global_step"] == 12
    assert torch.equal(loaded["student"]["w"], torch.arange(6.0))
    assert ckpt.read_manifest(copy) == ckpt.read_manifest(str(source))
    assert ckpt.load(str(src_run))[0] == str(source)  # the source is only read


@pytest.mark.budget(5)
def test_the_tune_checkpoint_is_a_json_pointer_and_nothing_else(tmp_path):
    write_pointer(str(tmp_path), "pb-t001", "s3://b/runs/pb-t001/checkpoint_x", 12)
    assert read_pointer(str(tmp_path)) == {"run_name": "pb-t001", "step": 12,
                                           "checkpoint": "s3://b/runs/pb-t001/checkpoint_x"}
    (tmp_path / "pointer.json").write_text(json.dumps({"run_name": "x", "step": "1"}))
    with pytest.raises(ValueError, match="not a pointer"):
        read_pointer(str(tmp_path))


@pytest.mark.budget(5)
def test_a_resumed_population_continues_with_each_trials_newest_values(tmp_path):
    record = SweepRecord.model_validate({
        "format": "dino-sweep/1", "name": "pb", "base": {},
        "spec": {"space": {"x": "uniform:0,5"}, "num_samples": 2, "max_concurrent": 2,
                 "asha_grace": 1, "collapse_patience": 2, "collapse_margin": 0.05,
                 "scheduler": "pbt"},
        "trials": [{"x": 1.0}, {"x": 2.0}]})
    for r in rows_of(("pb-t000", 0, "start", "", 1.0), ("pb-t001", 0, "start", "", 2.0),
                     ("pb-t000", 6, "exploit", "pb-t001", 2.4)):
        append_row(str(tmp_path), r)
    names = ["pb-t000", "pb-t001"]
    assert current_values(record, names, str(tmp_path), True) == [{"x": 2.4}, {"x": 2.0}]
    assert current_values(record, names, str(tmp_path), False) == [{"x": 1.0}, {"x": 2.0}]


@pytest.mark.budget(5)
def test_a_collapsed_trial_is_never_ranked_best(tmp_path):
    results = {"s-t000": TrialResult(status="collapsed", best_objective=90.0, detail="h"),
               "s-t001": TrialResult(status="ok", best_objective=40.0),
               "s-t002": TrialResult(status="error", best_objective=95.0)}
    rows = result_rows("s", [{"x": 1}, {"x": 2}, {"x": 3}], results, str(tmp_path))
    assert [r["run_name"] for r in rows][0] == "s-t001"
