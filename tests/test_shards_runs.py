"""Packed datasets in real runs: ``dino data pack`` as Ray tasks into moto's S3, then
``dino train`` from the bucket: 2 workers each reading their own shards (every image once per
epoch, from the reader's trace), a run killed mid-epoch and resumed (the same losses as
without the kill), a damaged shard skipped and named, and the Ray Data loader."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import pytest
from conftest import private_ray_tmpdir
from test_distill_runs import _file_sha, _teacher_file
from test_reliability_faults import _read_until, _start, kill_group
from test_service_train import TINY, dino

from dino_core.data.procedural import write_image_folder
from service.data.shards import read_manifest
from service.storage import checkpoints as ckpt

pytestmark = pytest.mark.integration
IMAGES = 96  # 3 classes of 24 px PNGs, ~1.2 kB each: 10 kB shards hold ~8
RUN = [*TINY, "data.num_workers=1", "train.batch_size=16", "eval.knn_every_epochs=0",
       "data.shuffle_buffer=8"]


@pytest.fixture(scope="module")
def packed(s3_server, module_ray, tmp_path_factory) -> str:
    """Packed by Ray tasks of the module's shared cluster (a cluster, as on a real one)."""
    src = tmp_path_factory.mktemp("src") / "imgs"
    write_image_folder(src, IMAGES, 24, 3, 0, masks=False)
    (src / "00_circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "01_square" / "notes.jpg").write_text("<html>404</html>")
    url = f"s3://{s3_server.new_bucket('shards')}/packed"
    out = dino("data", "pack", str(src), url, "--shard-mb", "0.01", "--address",
               module_ray.address)
    assert f"packed {IMAGES} images into" in out.stdout, out.stdout
    assert "2 unreadable files skipped" in out.stdout
    return url


@pytest.mark.budget(180)
def test_pack_into_the_bucket_counts_and_reports_unreadable_files(packed):
    import fsspec

    m = read_manifest(packed)
    assert m.num_images == IMAGES and m.skipped == 2 and len(m.shards) >= 8
    with fsspec.open(f"{packed}/pack-report.json") as f:
        report = json.load(f)
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["broken.png", "notes.jpg"]


def _keys(trace: Path, epoch: int) -> list[str]:
    return [k for f in sorted(trace.glob(f"epoch{epoch}-rank*-stream*.txt"))
            for k in f.read_text().split()]


@pytest.mark.budget(150)
def test_two_workers_each_read_their_shards_once_per_epoch(packed, module_ray, tmp_path):
    """Also the 2-worker Ray run of the DINOv2/v3 recipe (issue 23): iBOT, KoLeo across ranks
    and Sinkhorn-Knopp centering, whose sums run over both workers, train to the end."""
    trace = tmp_path / "trace"
    out = dino("train", *RUN, f"data.path={packed}", f"storage.root={tmp_path}",
               f"ray.address={module_ray.address}",
               "run_name=cover", "ray.num_workers=2", "ray.cpus_per_worker=0.5",
               "train.epochs=2", f"data.trace_dir={trace}", "tracking.enabled=false",
               "loss.ibot_weight=1.0", "loss.koleo_weight=0.1", "loss.koleo_distributed=true",
               "loss.centering=sinkhorn_knopp")
    assert "step 12/12" in out.stdout
    newest = ckpt.resolve(str(tmp_path / "cover"))
    _, state = ckpt.load(newest)
    assert any("mask_token" in k for k in state["student"]), sorted(state["student"])[:5]
    per_epoch = []
    for epoch in (0, 1):
        ranks = {f.name.split("-")[1] for f in trace.glob(f"epoch{epoch}-*.txt")}
        assert ranks == {"rank0", "rank1"}
        keys = _keys(trace, epoch)
        assert len(keys) == len(set(keys)) == IMAGES  # 96 = 2 ranks x 6 steps x 8: all, once
        per_epoch.append(keys)
    assert per_epoch[0] != per_epoch[1]  # another order each epoch


def _losses(db: Path, run_name: str) -> dict[int, float]:
    """The last logged loss per step (a killed run's unsaved steps are logged again)."""
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "SELECT m.step, m.value FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid "
            "WHERE m.key = 'loss' AND t.key = 'dino.run_name' AND t.value = ? "
            "ORDER BY m.timestamp, m.rowid", (run_name,)).fetchall()
    return dict(rows)


@pytest.mark.budget(360)
def test_a_run_killed_mid_epoch_resumes_with_the_same_losses(packed, module_ray, tmp_path):
    """The whole job preempted mid-epoch: driver, its own local Ray and the worker killed
    together (SIGKILL to the process group); the same command resumes, and its losses are
    those of a run never killed (trained on the module's shared cluster)."""
    common = [*RUN, f"data.path={packed}", f"storage.root={tmp_path}", "train.epochs=2",
              "train.checkpoint_every_steps=3", "ray.num_workers=1"]
    dino("train", *common, "run_name=straight", f"ray.address={module_ray.address}")
    with private_ray_tmpdir() as ray_dir:
        env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_dir)}
        proc = _start(["python", "-m", "service.cli", "train", *common, "run_name=killed"], env)
        lines: list[str] = []
        try:
            _read_until(proc, r"checkpoint saved at epoch 2 step 9", lines, 300)
        finally:
            kill_group(proc)
    again = dino("train", *common, "run_name=killed")
    m = re.search(r"resumed from \S+ at epoch 2 step (\d+)", again.stdout)
    assert m and 9 <= int(m.group(1)) < 12, again.stdout[-2000:]  # mid-epoch 2 (6 steps each)
    db = tmp_path / "mlflow.db"
    straight, killed = _losses(db, "straight"), _losses(db, "killed")
    assert sorted(straight) == sorted(killed) == list(range(1, 13))
    assert killed == straight  # the same floats, step by step


@pytest.mark.budget(60)
def test_a_damaged_shard_is_skipped_and_named(packed, tmp_path, caplog, capfd):
    """In process (the streaming reader's own handling; Ray only forwards the lines), from the
    bucket: a shard cut to a third is named, its images counted as unreadable."""
    import fsspec

    from service.config import load_config
    from service.tracking import NullTracker
    from service.train.context import InProcessContext
    from service.train.loop import Loop

    fs, _ = fsspec.core.url_to_fs(packed)
    damaged = packed + "-damaged"
    fs.copy(packed.removeprefix("s3://") + "/", damaged.removeprefix("s3://") + "/",
            recursive=True)
    m = read_manifest(damaged)
    victim = m.shards[2]
    data = fs.cat_file(f"{damaged}/{victim.name}")
    fs.pipe_file(f"{damaged}/{victim.name}", data[: len(data) // 3])
    cfg = load_config(None, None, [*RUN, f"data.path={damaged}", f"storage.root={tmp_path}",
                                   "run_name=damaged", "train.epochs=1", "data.num_workers=0",
                                   "tracking.enabled=false"])
    run_url = str(tmp_path / "damaged")
    with caplog.at_level("WARNING", logger="service.data.stream"):
        Loop(cfg, InProcessContext(run_url), run_url, NullTracker()).run()
    text = capfd.readouterr().out + caplog.text
    assert victim.name in caplog.text and "damaged" in caplog.text
    assert f"skipped {victim.num_images} unreadable images" in text


@pytest.mark.budget(150)
def test_the_ray_data_loader_trains_a_two_worker_distillation(packed, module_ray, tmp_path):
    """The Ray Data loader, and the 2-worker Ray run of distillation (issue 24; one run for
    both facts): a teacher file teaches the student on 2 workers; each worker re-hashes its
    frozen teacher after the last step and finds the file's weights; the checkpoint loads and
    holds the teacher's URI and hash, never its weights."""
    teacher = _teacher_file(tmp_path / "teacher.safetensors")
    out = dino("train", *RUN, f"data.path={packed}", f"storage.root={tmp_path}",
               f"ray.address={module_ray.address}", "ray.num_workers=2",
               "ray.cpus_per_worker=0.5", "run_name=raydata", "data.loader=ray_data",
               "train.epochs=1", "tracking.enabled=false", f"train.distill.teacher={teacher}")
    sha = _file_sha(teacher)
    assert "step 6/6" in out.stdout, out.stdout[-3000:]  # a global batch of 16 on 2 workers
    assert f"[dino] the teacher's weights are unchanged after 6 steps (SHA-256 {sha})" \
        in out.stdout, out.stdout[-3000:]
    newest = ckpt.resolve(str(tmp_path / "raydata"))
    uri, state = ckpt.load(newest)
    assert state["global_step"] == 6 and state["epoch"] == 1
    assert state["distill"]["teacher_sha256"] == sha
    assert ckpt.read_manifest(str(uri))["distill"]["teacher_sha256"] == sha
    assert all(k.startswith(("backbone.", "cls_proj.", "patch_proj.")) for k in state["student"])
