"""``dino tune --resume`` loads no pickle from storage (issue 27, item 1), and a sweep's result
rows take each value from the trial's own latest report of it (item 12). In process, no Ray:
the sweep's own record is JSON written and read here; the Ray half (a real sweep whose every
pickle is replaced, then resumed) is ``test_tune.py::test_resume_loads_no_planted_pickle``.

The planted files hold a pickle whose ``__reduce__`` creates a marker file: had anything
loaded one, the marker would exist."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import random
from pathlib import Path

import pytest
import torch
from test_service_train import TINY

from service.cli.main import main
from service.cli.tune import results_table
from service.config import ConfigError, load_config, resolve_paths
from service.storage import checkpoints as ckpt
from service.sweep import SweepSpec
from service.sweep.plan import load_plan, new_plan
from service.sweep.record import TrialLog, TrialResult, read_trial, trial_url, write_json
from service.sweep.results import result_rows, trial_run_name
from service.tracking import NullTracker
from service.train.context import InProcessContext
from service.train.loop import Loop

QUIET = [*TINY, "tracking.enabled=false", "run_name=tiny"]
PARAMS = ["--param", "loss.teacher_temp=grid:0.04,0.05", "--param", "optim.lr=uniform:1e-4,1e-3"]
# every pickle-format file Ray Tune 2.60 leaves in an experiment folder (<sweep>/ before this
# fix, <sweep>/tune/<time>/ now); names with <t> carry a time stamp
TUNE_PICKLES = ["tuner.pkl", "basic-variant-state-<t>.json", "searcher-state-<t>.pkl",
                "callback-states-<t>.pkl", "<trial>/params.pkl", "<trial>/error.pkl"]


class Plant:
    """What an attacker's pickle would do, harmlessly: loading it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_tune_files(folder: Path, marker: Path) -> list[Path]:
    """A malicious pickle in every file Tune would unpickle on restore, and one embedded in
    its experiment state JSON (``CLOUDPICKLE_FALLBACK``, which Tune's decoder expands)."""
    blob = pickle.dumps(Plant(marker))
    planted = []
    for name in TUNE_PICKLES:
        path = folder / name.replace("<t>", "2026-12-03_00-00-00").replace("<trial>", "_trial_0")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        planted.append(path)
    state = folder / "experiment_state-2026-12-03_00-00-00.json"
    state.write_text(json.dumps({"trial_data": [], "runner_data": {
        "_type": "CLOUDPICKLE_FALLBACK", "value": blob.hex()}}))
    return [*planted, state]


def started_sweep(root: Path, name: str = "sw") -> tuple[str, SweepSpec]:
    """A sweep's record as ``dino tune`` writes it before Ray starts, every trial finished."""
    cfg = resolve_paths(load_config(None, None, [*QUIET, f"storage.root={root}"]))
    spec = SweepSpec(name, {"loss.teacher_temp": "grid:0.04,0.05",
                            "optim.lr": "uniform:1e-4,1e-3"})
    url = str(root / name)
    record = new_plan(cfg, spec, url, random.Random(1))
    log = TrialLog(url, {trial_run_name(name, i): TrialResult() for i in range(2)})
    for i, knn in enumerate([40.0, 55.0]):
        run = trial_run_name(name, i)
        log.started(run)
        log.reported(run, {"epoch": 2, "step": 16, "teacher_entropy": 3.0, "knn_top1": knn},
                     "knn_top1")
        log.ended(run, "ok")
    assert len(record.trials) == 2
    return url, spec


def resume(root: Path, name: str = "sw") -> int:
    return main(["tune", *QUIET, f"storage.root={root}", "--name", name, *PARAMS, "--resume"])


def test_resume_reads_the_sweeps_json_and_never_tunes_pickles(tmp_path, capsys):
    """A finished sweep, every Tune pickle replaced (old and new layout): the resume
    publishes the table from the sweep's own record, starts no Ray and loads none of them."""
    url, _ = started_sweep(tmp_path)
    marker = tmp_path / "PWNED"
    planted = plant_tune_files(Path(url), marker) + plant_tune_files(Path(url, "tune", "t"), marker)
    assert resume(tmp_path) == 0
    out = capsys.readouterr().out
    assert not marker.exists(), "a planted pickle was loaded"
    assert all(p.read_bytes()[:1] in (b"\x80", b"{") for p in planted)  # left as they were
    assert "2 of 2 trials finished, 0 to run (Ray Tune's own files there are never read)" in out
    assert out.index("55.00") < out.index("40.00")  # best first, from trials/*.json


@pytest.mark.parametrize("which", ["sweep.json", "trials/sw-t001.json"])
def test_a_pickle_in_place_of_the_sweeps_own_record_is_refused_naming_it(tmp_path, capsys,
                                                                         which):
    started_sweep(tmp_path)
    marker = tmp_path / "PWNED"
    (tmp_path / "sw" / which).write_bytes(pickle.dumps(Plant(marker)))
    assert resume(tmp_path) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"{tmp_path}/sw/{which}: refused: not the JSON" in err, err
    assert "nothing of it was loaded or run" in err


@pytest.mark.parametrize(("edit", "said"), [
    (lambda r: r["trials"][0].update({"loss.teacher_temp": 0.9}),
     "trials.0: loss.teacher_temp=0.9 is not in grid:0.04,0.05"),
    (lambda r: r["trials"][1].update({"optim.lr": 5.0}), "trials.1: optim.lr=5.0 is not in"),
    (lambda r: r["base"]["optim"].update({"lr": -1}), "base is not a valid config"),
    (lambda r: r.update({"tuner": "x"}), "tuner: Extra inputs are not permitted"),
    (lambda r: r["trials"].pop(), "1 trials, the space makes 2"),
])
def test_a_forged_sweep_record_is_refused_naming_the_field(tmp_path, edit, said):
    url, spec = started_sweep(tmp_path)
    record = json.loads(Path(url, "sweep.json").read_text())
    edit(record)
    Path(url, "sweep.json").write_text(json.dumps(record))
    cfg = resolve_paths(load_config(None, None, [*QUIET, f"storage.root={tmp_path}"]))
    with pytest.raises(ConfigError, match="sweep.json: ") as err:
        load_plan(cfg, spec, url)
    assert said in str(err.value)


def test_a_forged_trial_result_is_refused_naming_the_field(tmp_path):
    url, _ = started_sweep(tmp_path)
    Path(trial_url(url, "sw-t000")).write_text(json.dumps({"status": "ok", "epochs": -3}))
    with pytest.raises(ConfigError, match=r"trials/sw-t000.json: refused: .*epochs"):
        read_trial(url, "sw-t000")


def test_resume_needs_the_sweeps_own_record_and_the_same_space(tmp_path, capsys):
    """A sweep folder of Tune's files alone (an old sweep, or a planted one) is not resumed;
    a fresh sweep of an existing name is refused; another space is refused."""
    marker = tmp_path / "PWNED"
    plant_tune_files(tmp_path / "old", marker)
    assert resume(tmp_path, "old") == 2
    assert "no sweep to resume at" in capsys.readouterr().err and not marker.exists()
    started_sweep(tmp_path)
    assert main(["tune", *QUIET, f"storage.root={tmp_path}", "--name", "sw", *PARAMS]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["tune", *QUIET, f"storage.root={tmp_path}", "--name", "sw", "--resume",
                 "--param", "loss.teacher_temp=grid:0.04"]) == 2
    err = capsys.readouterr().err
    assert "--param loss.teacher_temp=grid:0.04,0.05 --param optim.lr=uniform:1e-4,1e-3" in err


@pytest.mark.parametrize("status", ["pending", "running", "error"])
def test_resume_hands_tune_only_the_unfinished_trials_under_their_run_names(tmp_path,
                                                                          monkeypatch, status):
    """Tune (the Ray boundary, replaced here) gets the trials not finished (never started,
    interrupted, failed), with the values drawn at the start, under the run names whose
    checkpoints they continue from; a finished trial is kept as recorded."""
    import service.sweep.run as sweep_run

    url, spec = started_sweep(tmp_path)
    first = json.loads(Path(url, "sweep.json").read_text())["trials"]
    if status == "pending":  # no result written: the driver died before the trial started
        Path(trial_url(url, "sw-t000")).unlink()
    else:
        data = json.loads(Path(trial_url(url, "sw-t000")).read_text())
        write_json(trial_url(url, "sw-t000"), {**data, "status": status})
    handed = {}
    monkeypatch.setattr(sweep_run, "_tune", lambda base, spec, record, todo, *a: handed.update(
        todo=todo, trials=record.trials))
    assert resume(tmp_path) == 0
    assert handed == {"todo": [0], "trials": first}
    assert isinstance(first[0]["optim.lr"], float) and 1e-4 <= first[0]["optim.lr"] <= 1e-3


def test_resume_of_a_sweep_never_started_starts_it(tmp_path, monkeypatch, capsys):
    """A retried job says --resume from its first attempt on (k8s/base/rayjob-tune.yaml):
    with nothing at the sweep's place yet, it starts the sweep; every trial goes to Tune."""
    import service.sweep.run as sweep_run

    handed = {}
    monkeypatch.setattr(sweep_run, "_tune", lambda base, spec, record, todo, *a: handed.update(
        todo=todo))
    assert resume(tmp_path, "fresh") == 0
    assert "no sweep 'fresh' at" in capsys.readouterr().out and handed == {"todo": [0, 1]}
    assert Path(tmp_path, "fresh", "sweep.json").is_file()


# ---------------------------------------------------------------------------- item 12
# Ray Train's reports as the loop sends them: an epoch's end (k-NN, the teacher's entropy),
# then a mid-epoch checkpoint (train.checkpoint_every_steps) that has neither, and the epoch
# it is in; Tune adds its own keys to each
REPORTS = [
    {"epoch": 1, "step": 8, "loss": 5.1, "teacher_entropy": 2.46, "knn_top1": 40.0},
    {"epoch": 2, "step": 16, "loss": 4.9, "teacher_entropy": 2.51, "knn_top1": 37.5},
    {"epoch": 2, "step": 20, "loss": 4.8, "checkpoint_path": "b/sw-t000/checkpoint_x"},
]


def test_a_row_takes_each_value_from_the_trials_latest_report_of_it(tmp_path):
    log = TrialLog(str(tmp_path), {"sw-t000": TrialResult()})
    for i, report in enumerate(REPORTS):
        log.reported("sw-t000", {**report, "training_iteration": i + 1, "trial_id": "x"},
                     "knn_top1")
    log.ended("sw-t000", "error", "TrainingFailedError: worker died")
    row = result_rows("sw", [{"loss.teacher_temp": 0.04}], log.results, "/r")[0]
    assert row["teacher_entropy"] == 2.51 and row["epochs"] == 2
    assert row["knn_top1"] == 40.0 and row["last_knn_top1"] == 37.5
    assert row["status"] == "error: TrainingFailedError: worker died"
    assert read_trial(str(tmp_path), "sw-t000") == log.results["sw-t000"]  # as written


def test_the_table_shows_a_dash_for_a_value_never_reported():
    rows = result_rows("sw", [{"optim.lr": 0.001}], {"sw-t000": TrialResult()}, "/r")
    table = results_table(rows, ["optim.lr"])
    assert "nan" not in table and "epochs" in table.splitlines()[0]
    assert table.splitlines()[1].split() == ["0.001", "-", "-", "-", "not", "finished"]


# ---------------------------------------------------------------------------- a run's folder
def forge(checkpoint: Path, marker: Path) -> None:
    """A malicious ``state.pt`` (a torch file, as ours are) and a manifest that matches it:
    the manifest's SHA-256 is in the same storage, so it proves nothing against a writer."""
    torch.save({"student": Plant(marker)}, checkpoint / ckpt.STATE)
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        blob = (checkpoint / name).read_bytes()
        entry.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.budget(20)  # one in-process epoch of 8 steps: 1.5 s here, 4.9 s on a busy machine
def test_a_runs_planted_checkpoint_pickles_are_refused_naming_each(tmp_path, caplog,
                                                                   one_torch_thread):
    """Every pickle-format file of a run folder (its checkpoints' ``state.pt``; Ray Train's
    ``checkpoint_manager_snapshot.json`` is JSON) replaced with a forged manifest: the
    resume loads none, names each, and starts afresh."""
    cfg = load_config(None, None, [*QUIET, f"storage.root={tmp_path}", "run_name=r",
                                   "train.epochs=1"])
    run_url = str(tmp_path / "r")
    Loop(cfg, InProcessContext(run_url, 2), run_url, NullTracker()).run()
    checkpoints = [Path(c) for c in ckpt.checkpoint_dirs(run_url)]
    pickles = [p for p in Path(run_url).rglob("*") if p.is_file()
               and p.read_bytes()[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK")]
    assert sorted(pickles) == sorted(c / ckpt.STATE for c in checkpoints) and pickles, pickles
    marker = tmp_path / "PWNED"
    for c in checkpoints:
        forge(c, marker)
    with caplog.at_level(logging.WARNING):
        loop = Loop(cfg, InProcessContext(run_url, 2), run_url, NullTracker())
    assert not marker.exists(), "a planted checkpoint pickle was loaded"
    assert loop.restored_from is None and loop.state.global_step == 0
    said = "\n".join(r.getMessage() for r in caplog.records)
    for p in pickles:
        assert f"{p}: refused" in said, said


def test_no_value_in_a_trial_result_is_nan(tmp_path):
    log = TrialLog(str(tmp_path), {"t": TrialResult()})
    log.reported("t", {"knn_top1": math.nan, "teacher_entropy": math.inf, "epoch": 1}, "knn_top1")
    assert log.results["t"].best_objective is None and log.results["t"].teacher_entropy is None
