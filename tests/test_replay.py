"""``dino train --replay SWEEP[/TRIAL]`` and the lineage picture (issue 25), in process, no
Ray: a population-based sweep's folder is written here by hand (``sweep.json`` as
``plan.new_plan`` writes it, ``trials/*.json``, lineage rows with exploits), the replay's config
is built by the command's own function, and that config trains in the real loop, whose
per-step teacher temperature and momentum must follow the trial's lineage."""

from __future__ import annotations

import math
import random

import pytest
from test_pbt_schedules import per_step
from test_train_loop import TINY, LossRecorder

from service.api.training import replay_config
from service.cli.main import main
from service.config import ConfigError, load_config
from service.sweep import SweepSpec
from service.sweep.lineage import LineageRow, append_row, read_rows
from service.sweep.lineage_plot import schedules_plot
from service.sweep.plan import new_plan
from service.sweep.record import TrialResult, trial_url, write_json
from service.sweep.replay import load, locate, value_changes
from service.sweep.results import trial_run_name
from service.train.context import InProcessContext
from service.train.loop import Loop

# the tests of plain numbers and files: well under 0.1 s each; the loop's mark their own
pytestmark = pytest.mark.budget(5)
TT, M = "loss.teacher_temp", "optim.momentum_teacher"
BASE = [*TINY, "train.epochs=3", "loss.warmup_teacher_temp=0.02",
        "loss.warmup_teacher_temp_epochs=2", "run_name=base"]
# t000 and t001 start; at step 5 t001 takes t000's checkpoint, at step 13 t002 takes t001's:
# t002 trained with t000's values to step 5, t001's new ones to 13, then its own
LINEAGE = [
    ("t000", 0, "start", "", {TT: 0.04, M: 0.99}),
    ("t001", 0, "start", "", {TT: 0.05, M: 0.996}),
    ("t002", 0, "start", "", {TT: 0.06, M: 0.99}),
    ("t001", 5, "exploit", "t000", {TT: 0.045, M: 0.995}),
    ("t002", 13, "exploit", "t001", {TT: 0.055, M: 0.995}),
]
RESULTS = {"t000": ("ok", 40.0), "t001": ("collapsed", 70.0), "t002": ("ok", 55.0)}


def make_sweep(root, name: str, lineage=LINEAGE, results=RESULTS) -> str:
    """A sweep's folder as a PBT sweep leaves it: its plan, its trials' results, its lineage."""
    base = load_config(None, None, [*BASE, f"storage.root={root}"])
    url = str(root / name)
    spec = SweepSpec(name, space={TT: "grid:0.04,0.05,0.06", M: "choice:0.99,0.996"})
    new_plan(base, spec, url, random.Random(0))
    for short, (status, best) in results.items():
        run = f"{name}-{short}"
        write_json(trial_url(url, run), TrialResult(status=status, best_objective=best).model_dump())
    for short, step, event, source, values in lineage:
        append_row(url, LineageRow(trial=f"{name}-{short}", step=step, event=event,
                                   source=f"{name}-{source}" if source else "", values=values))
    return url


def command(root, *overrides: str):
    return load_config(None, None, [f"storage.root={root}", "tracking.enabled=false", *overrides])


@pytest.mark.budget(15)  # 18 in-process steps of a tiny ViT: 1.3-1.8 s here (2026-12-04)
def test_the_replay_of_the_best_trial_trains_with_its_lineage_step_by_step(
        tmp_path, one_torch_thread, capsys):
    make_sweep(tmp_path, "pbt")
    cfg = replay_config("pbt", command(tmp_path), [])
    line = capsys.readouterr().out.strip()
    # the best trial that did not collapse (t001 scored higher, but collapsed)
    assert line == ("[dino] replaying trial pbt-t002 of sweep 'pbt' (ok, best knn_top1 55) as "
                    f"run 'pbt-replay-t002': step 0: {TT}=0.04 {M}=0.99; "
                    f"step 5: {TT}=0.045 {M}=0.995; step 13: {TT}=0.055 {M}=0.995")
    assert cfg.run_name == "pbt-replay-t002" and cfg.storage.root == str(tmp_path)
    assert (cfg.loss.teacher_temp, cfg.optim.momentum_teacher) == (0.04, 0.99)
    assert [c.model_dump() for c in cfg.train.value_changes] == [
        {"step": 5, "values": {TT: 0.045, M: 0.995}}, {"step": 13, "values": {TT: 0.055}}]
    assert cfg.model.depth == 1 and cfg.train.epochs == 3  # the sweep's base config

    run_url = str(tmp_path / cfg.run_name)
    tracker = LossRecorder()
    Loop(cfg, InProcessContext(run_url, cfg.train.keep_last), run_url, tracker).run()
    total = 18
    temps, moms = per_step(tracker, "teacher_temp"), per_step(tracker, "momentum")
    assert sorted(temps) == sorted(moms) == list(range(total))
    segments = [(0, 0.04, 0.99), (5, 0.045, 0.995), (13, 0.055, 0.995)]  # the lineage's

    def values_at(t: int) -> tuple[float, float]:  # the paper's formulas, segment by segment
        _, temp, m = max((s for s in segments if s[0] <= t), key=lambda s: s[0])
        epoch = t // 6
        tt = 0.02 + (temp - 0.02) * epoch if epoch < 2 else temp  # 2 warm-up epochs
        return tt, 1 + 0.5 * (m - 1) * (1 + math.cos(math.pi * t / total))

    expected = [values_at(t) for t in range(total)]
    assert [temps[t] for t in range(total)] == pytest.approx([e[0] for e in expected], rel=1e-12)
    assert [moms[t] for t in range(total)] == pytest.approx([e[1] for e in expected], rel=1e-12)


def test_a_named_trial_a_url_a_run_name_and_overrides(tmp_path, capsys):
    url = make_sweep(tmp_path, "pbt")
    cfg = replay_config("pbt/t001", command(tmp_path, "run_name=mine", "train.epochs=5"),
                  ["run_name=mine", "train.epochs=5"])
    assert "replaying trial pbt-t001 of sweep 'pbt' (collapsed, " in capsys.readouterr().out
    assert cfg.run_name == "mine" and cfg.train.epochs == 5
    assert [c.step for c in cfg.train.value_changes] == [5]
    assert locate(f"{url}/pbt-t000", "elsewhere") == ("pbt", url, "pbt-t000")
    assert locate(f"file://{url}/", "elsewhere") == ("pbt", f"file://{url}", None)
    assert locate("pbt/t7", str(tmp_path))[2] == trial_run_name("pbt", 7)
    _, replay = load(f"{url}/t000", "elsewhere")
    assert replay.trial == "pbt-t000" and replay.schedule == [(0, {TT: 0.04, M: 0.99})]
    assert value_changes(replay.schedule) == []
    with pytest.raises(ConfigError, match="takes no --resume"):
        replay_config("pbt", command(tmp_path), ["train.resume=/somewhere"])


def test_clear_errors(tmp_path, capsys):
    make_sweep(tmp_path, "pbt")
    make_sweep(tmp_path, "asha", lineage=[])
    make_sweep(tmp_path, "dead", results={"t000": ("collapsed", 40.0), "t001": ("error", None)})
    cmd = command(tmp_path)
    for target, message in [
        ("nope", f"--replay nope: no sweep 'nope' at {tmp_path}/nope (no sweep.json)"),
        ("asha", "--replay asha: sweep 'asha' has no lineage"),
        ("pbt/t009", "--replay pbt/t009: sweep 'pbt' has no trial 'pbt-t009'; its trials are "
                     "pbt-t000 to pbt-t002"),
        ("dead", "--replay dead: no trial of sweep 'dead' finished without collapsing "
                 "(statuses: collapsed, error, pending)"),
    ]:
        with pytest.raises(ConfigError) as err:
            replay_config(target, cmd, [])
        assert str(err.value).startswith(message), str(err.value)
    # through the command line: one line, exit 2, before anything starts
    assert main(["train", "--replay", "nope", f"storage.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dino: --replay nope: no sweep 'nope'") and "\n" not in err


def test_a_lineage_that_changes_a_setting_no_schedule_reads_is_refused(tmp_path):
    lineage = [("t000", 0, "start", "", {TT: 0.04, "model.out_dim": 64}),
               ("t000", 6, "exploit", "t001", {TT: 0.05, "model.out_dim": 128}),
               ("t001", 0, "start", "", {TT: 0.05, "model.out_dim": 64})]
    make_sweep(tmp_path, "odd", lineage=lineage, results={"t000": ("ok", 50.0)})
    with pytest.raises(ConfigError, match="changed model.out_dim at step 6: only schedule"):
        replay_config("odd/t000", command(tmp_path), [])


@pytest.mark.budget(10)  # matplotlib's import and two figures: 1.4-2.5 s here (2026-12-04)
def test_the_lineage_picture_is_a_png(tmp_path):
    url = make_sweep(tmp_path, "pbt")
    rows = read_rows(url, [trial_run_name("pbt", i) for i in range(3)])
    objective = {"pbt-t000": 40.0, "pbt-t001": None, "pbt-t002": 55.0}
    path = schedules_plot(rows, objective, str(tmp_path / "pbt_schedules.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # no objective at all yet: every trial grey, no colour bar
    blank = schedules_plot(rows, {}, str(tmp_path / "blank.png"))
    assert (tmp_path / "blank.png").stat().st_size > 1000 and blank.endswith("blank.png")
