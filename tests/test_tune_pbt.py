"""A population-based sweep (``dino tune --scheduler pbt``) of 4 tiny trials, perturbation
interval one epoch, on a local Ray with local storage and an MLflow server (S3 storage: the
ASHA sweep of test_tune.py; the exploit's copy is one fsspec ``copy`` per file, the same call
on either). One trial's teacher
temperature (0.9) collapses the teacher; it reports the lowest objective and is replaced by a
copy of a winner. Needs Ray (not in-process): PBT is Tune's scheduler pausing, restarting and
cloning trial actors, each of which fits a Ray Train TorchTrainer."""

from __future__ import annotations

import calendar
import json
import time

import pytest
from test_service_train import TINY, dino

pytestmark = pytest.mark.integration

LOW = {"loss.teacher_temp": 0.04, "optim.momentum_teacher": 0.99}
HIGH = {"loss.teacher_temp": 0.9, "optim.momentum_teacher": 0.996}


def pbt_args(root: str, tracking_uri: str) -> list[str]:
    return [
        "tune", *TINY, "run_name=tiny", f"storage.root={root}",
        f"tracking.uri={tracking_uri}", "ray.num_workers=1", "ray.cpus_per_worker=0.5",
        "ray.num_cpus=2", "train.epochs=3", "train.keep_last=4", "data.procedural_size=96",
        "--name", "pb", "--max-concurrent", "4", "--scheduler", "pbt",
        "--perturbation-interval", "1",
        "--param", "loss.teacher_temp=grid:0.04,0.05,0.06,0.9",
        "--param", "optim.momentum_teacher=uniform:0.99,0.996", "--json",
    ]  # fmt: skip


def checkpoints_by_step(fs, run: str) -> dict[int, list[tuple[str, dict]]]:
    """``{global_step: [(checkpoint path, manifest), ...]}`` of a run folder."""
    out: dict[int, list[tuple[str, dict]]] = {}
    for p in fs.ls(run):
        if p.rsplit("/", 1)[-1].startswith("checkpoint_") and fs.isdir(p):
            m = json.loads(fs.cat_file(f"{p}/manifest.json"))
            out.setdefault(m["global_step"], []).append((p, m))
    return out


def made_at(path: str) -> float:
    """The UTC time in a checkpoint's name (``checkpoint_2026-12-04_18-28-25.856257``)."""
    stamp = path.rsplit("/", 1)[-1].removeprefix("checkpoint_")
    whole, frac = stamp.split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%d_%H-%M-%S")) + float("0." + frac)


@pytest.mark.budget(300)
def test_pbt_exploits_copy_a_winners_state_and_go_on_with_new_values(mlflow_server, tmp_path):
    import fsspec
    from mlflow.tracking import MlflowClient

    runs = str(tmp_path / "runs")
    out = dino(*pbt_args(runs, mlflow_server.tracking_uri), timeout=600)
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    fs = fsspec.filesystem("file")
    lineage = {r["run_name"]: json.loads(fs.cat_file(f"{runs}/pb/lineage/"
                                                      f"{r['run_name']}.json"))["rows"]
               for r in rows}
    exploits = [x for rs in lineage.values() for x in rs if x["event"] == "exploit"]
    assert exploits, lineage

    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name("dino")
    mlruns = {r["run_name"]: client.search_runs([exp.experiment_id],
                                              f"tags.`dino.run_name` = '{r['run_name']}'")[0]
            for r in rows}
    for x in exploits:
        target, source, step = x["trial"], x["source"], x["step"]
        # the copy in the target's own folder: the source's checkpoint of that step, byte
        # for byte (weights, optimizer, centers, data position), made after the source's
        ours = checkpoints_by_step(fs, f"{runs}/{target}")[step]
        theirs = checkpoints_by_step(fs, f"{runs}/{source}")[step]
        shas = {m["files"]["state.pt"]["sha256"] for _, m in theirs}
        copies = [(p, m) for p, m in ours if m["files"]["state.pt"]["sha256"] in shas]
        assert copies, (target, source, step)
        copied_at = made_at(copies[-1][0])
        assert f"[dino] resumed from {copies[-1][0]} at epoch" in out.stdout + out.stderr
        # its first step after the exploit is the copied step + 1 (no restart from 0)
        history = client.get_metric_history(mlruns[target].info.run_id, "loss")
        after = sorted((h for h in history if h.timestamp / 1000 > copied_at),
                       key=lambda h: h.timestamp)
        if step < 3 * 6:  # not the last step of the run: it trained on
            assert after and after[0].step == step + 1, [(h.step, h.timestamp) for h in after]
        # its values after the exploit differ from the source's then, inside the space
        source_then = [r for r in lineage[source] if r["step"] <= step][-1]["values"]
        for key, (lo, hi) in {"loss.teacher_temp": (0.04, 0.9),
                              "optim.momentum_teacher": (0.99, 0.996)}.items():
            assert lo <= x["values"][key] <= hi
            assert x["values"][key] != source_then[key]
        # the trial's MLflow run has its values over steps
        temps = client.get_metric_history(mlruns[target].info.run_id, "pbt.loss.teacher_temp")
        assert any(h.value == pytest.approx(x["values"]["loss.teacher_temp"]) for h in temps)

    # the collapsing trial was replaced by a copy, not kept; the best is a healthy trial
    collapsing = next(n for n, rs in lineage.items()
                      if rs[0]["values"]["loss.teacher_temp"] == 0.9)
    assert any(x["event"] == "exploit" for x in lineage[collapsing]), lineage[collapsing]
    assert rows[0]["status"] == "ok" and rows[0]["knn_top1"] > 0
    files = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{runs}/pb")}
    assert {"pbt_lineage.csv", "pbt_schedules.png", "results.csv", "sweep.json"} <= files
    csv_text = fs.cat_file(f"{runs}/pb/pbt_lineage.csv").decode()
    assert csv_text.splitlines()[0] == ("trial,step,event,source,loss.teacher_temp,"
                                        "optim.momentum_teacher")
    assert len(csv_text.splitlines()) == 1 + sum(len(rs) for rs in lineage.values())
    parent = client.search_runs([exp.experiment_id], "tags.`dino.run_name` = 'pb'")[0]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pbt_lineage.csv", "pbt_schedules.png"} <= artifacts
