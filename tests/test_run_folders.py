"""Run folders are accepted wherever a checkpoint is; Ray's snapshot file never is.

Also the sweep's chance level, taken from the labeled split's own class count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dino_core import build_networks
from service.config import backbone_meta, load_config, network_spec, to_yaml
from service.errors import CheckpointError
from service.storage import checkpoints as ckpt

SMALL = ["eval.procedural_train_size=24", "eval.procedural_val_size=12", "model.depth=1"]


def _write(directory: Path, step: int) -> Path:
    cfg = load_config("quickstart", overrides=SMALL)
    student, teacher = build_networks(network_spec(cfg))
    state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
             "config": cfg.model_dump(mode="json"), "backbone_meta": backbone_meta(cfg),
             "epoch": 0, "global_step": step}
    return ckpt.write_checkpoint(directory, state, to_yaml(cfg))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """Two complete checkpoints, a newer unfinished one and Ray's snapshot file, as a run
    folder looks after a crash during a checkpoint."""
    run = tmp_path_factory.mktemp("runs") / "demo"
    _write(run / "checkpoint_2026-12-01_10-00-00.000001", 8)
    _write(run / "checkpoint_2026-12-01_10-05-00.000001", 16)
    unfinished = _write(run / "checkpoint_2026-12-01_10-10-00.000001", 24)
    (unfinished / ckpt.MANIFEST).unlink()
    (run / ckpt.RAY_SNAPSHOT).write_text("{}")
    return run


def test_resolve_takes_the_newest_complete_checkpoint_of_a_run_folder(run_folder):
    newest = str(run_folder / "checkpoint_2026-12-01_10-05-00.000001")
    assert ckpt.resolve(str(run_folder)) == newest
    assert ckpt.resolve(str(run_folder) + "/") == newest
    assert ckpt.resolve(newest) == newest  # a checkpoint is itself
    dirs = ckpt.checkpoint_dirs(str(run_folder))
    assert dirs and all(not d.endswith(".json") for d in dirs)


def test_ray_snapshot_file_and_other_non_checkpoints_are_refused_by_name(run_folder, tmp_path):
    with pytest.raises(CheckpointError, match="Ray's record of the run, not a checkpoint"):
        ckpt.resolve(str(run_folder / ckpt.RAY_SNAPSHOT))
    with pytest.raises(CheckpointError, match="no such checkpoint or run folder"):
        ckpt.resolve(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        ckpt.resolve(str(tmp_path / "empty"))


def test_cli_evaluates_and_exports_a_run_folder(run_folder, tmp_path, capsys):
    from service.cli import main

    assert main(["eval", "knn", "--checkpoint", str(run_folder), "--train", "procedural",
                 "--val", "procedural", "--image-size", "32", "--k", "5", "--json",
                 "--num-workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_train"] == 24 and res["n_val"] == 12
    out = tmp_path / "b.safetensors"
    assert main(["export", "--checkpoint", str(run_folder), "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(run_folder / ckpt.RAY_SNAPSHOT),
                 "--train", "procedural", "--val", "procedural"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dino: ") and ckpt.RAY_SNAPSHOT in err[0]


@pytest.mark.budget(30)  # 13.3 s in the two-lane suite, beside an integration module
def test_a_new_run_resumes_from_another_runs_folder(tmp_path, one_torch_thread):
    from service.tracking import NullTracker
    from service.train.context import InProcessContext
    from service.train.loop import Loop

    def loop(name: str, *overrides: str) -> Loop:
        cfg = load_config("quickstart", overrides=[
            *SMALL, f"storage.root={tmp_path}", f"run_name={name}", "data.procedural_size=64",
            "data.num_workers=0", "tracking.enabled=false", "eval.knn_every_epochs=0",
            "train.checkpoint_every_steps=1", *overrides])
        run = Loop(cfg, InProcessContext(str(tmp_path / name)), str(tmp_path / name),
                   NullTracker())
        run.run()
        return run

    loop("first", "train.max_steps=2")
    newest = ckpt.checkpoint_dirs(str(tmp_path / "first"))[-1]
    resumed = loop("next", f"train.resume={tmp_path / 'first'}", "train.max_steps=3")
    assert resumed.restored_from == newest and resumed.state.global_step == 3


def test_sweep_chance_comes_from_the_labeled_splits_class_count(tmp_path):
    from PIL import Image

    from service.sweep import knn_chance

    for split in ("train", "val"):
        for c in range(4):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8), (c * 60, 0, 0)).save(folder / "a.png")
    folders = load_config("quickstart", overrides=[f"eval.train_path={tmp_path / 'train'}",
                                                   f"eval.val_path={tmp_path / 'val'}"])
    assert knn_chance(folders) == pytest.approx(25.0)
    procedural = load_config("quickstart", overrides=["data.procedural_classes=5"])
    assert knn_chance(procedural) == pytest.approx(20.0)
