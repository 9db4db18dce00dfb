"""Training through the service with real services: Ray Train workers, moto's S3 server,
an MLflow server; resume from the bucket; planted secrets leak nowhere. (A resumed run's
losses equal an uninterrupted one's under Ray in test_shards_runs, killed mid-epoch, and in
test_reliability_faults, killed worker; in process in test_train_loop.)"""

from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# A run small enough for 2 CPU cores: 8 steps per epoch of 16 images.
TINY = [
    "model.arch=vit_tiny", "model.patch_size=8", "model.depth=1", "model.out_dim=256",
    "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "model.drop_path_rate=0.1",
    "data.procedural_size=128", "data.procedural_image_size=24", "data.num_workers=0",
    "aug.global_size=16", "aug.local_size=8", "aug.n_local=2",
    "train.batch_size=16", "train.log_every_steps=1", "train.checkpoint_every_epochs=1",
    "train.keep_last=2", "optim.warmup_epochs=1", "optim.lr=0.002",
    "eval.procedural_train_size=64", "eval.procedural_val_size=32", "eval.image_size=16",
]


def dino(*args: str, env: dict | None = None, timeout: int = 600,
         drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``dino ARGS`` in a process of its own (its own local Ray unless ``ray.address=``);
    ``drop``: variables of this process's environment it does not get."""
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
        timeout=timeout, env={**environ, "RAY_ADDRESS": "", **(env or {})},
    )
    assert out.returncode == 0, f"dino {' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return out


def ray_lines(out: subprocess.CompletedProcess) -> list[str]:
    """Lines of a run's output that are not ours: ``[dino] ...`` (forwarded from a worker or
    not, without Ray's prefix or colour codes), and the summary under ``[dino] done``."""
    ours = re.compile(r"^\[dino\] |^  |^$")
    return [ln for ln in (out.stdout + out.stderr).splitlines() if not ours.search(ln)]


def run_of(tracking_uri: str, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("dino")
    runs = client.search_runs([exp.experiment_id], f"tags.`dino.run_name` = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _planted_secrets() -> tuple[dict[str, str], list[str]]:
    """Secret-looking environment values, and every form in which they could leak (as they
    are, and as they would travel in headers: Bearer as is, Basic base64-encoded)."""
    planted = {
        "AWS_SECRET_ACCESS_KEY": f"aws-{secrets.token_hex(12)}",  # moto accepts any secret
        "MLFLOW_TRACKING_TOKEN": f"mlt-{secrets.token_hex(12)}",
        "MLFLOW_TRACKING_USERNAME": "dino-user",
        "MLFLOW_TRACKING_PASSWORD": f"mlp-{secrets.token_hex(12)}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # the local cluster's token
    }
    values = [v for k, v in planted.items() if k.endswith(("KEY", "TOKEN", "PASSWORD"))]
    basic = f"{planted['MLFLOW_TRACKING_USERNAME']}:{planted['MLFLOW_TRACKING_PASSWORD']}"
    needles = [*values, base64.b64encode(basic.encode()).decode()]
    needles += [base64.b64encode(v.encode()).decode() for v in values]
    return planted, needles


def _files(directory: Path) -> Iterator[Path]:
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


@pytest.mark.budget(300)
def test_two_workers_s3_mlflow_then_resume_from_bucket_and_no_secret_leaks(
    s3_server, mlflow_server, tmp_path, ray_tmp
):
    """Two Ray Train workers, checkpoints in moto's S3, metrics on an MLflow server; the same
    run name resumes from the bucket. Both runs get planted secrets in their environment, and
    none appears in their output (the second with ``-v``: Ray's own lines too), their Ray
    session files, the stored objects, MLflow's params, tags and artifacts, or the servers'
    logs. The first run's output is quiet: only our lines."""
    import s3fs

    planted, needles = _planted_secrets()

    def leaks(blob: str | bytes) -> list[str]:
        text = blob.decode("latin-1") if isinstance(blob, bytes) else blob
        return [n for n in needles if n in text]

    bucket = s3_server.new_bucket("ckpt")
    root = f"s3://{bucket}/runs"
    env = {**planted, "RAY_TMPDIR": str(ray_tmp)}
    common = [*TINY, "run_name=s3run", f"storage.root={root}",
              f"tracking.uri={mlflow_server.tracking_uri}", "ray.num_workers=2",
              "ray.cpus_per_worker=0.5", "eval.knn_every_epochs=1"]
    first = dino("train", *common, "train.epochs=2", env=env, drop=("RAY_AUTH_TOKEN_PATH",))
    assert "k-NN top-1" in first.stdout
    # quiet by default: no line of Ray's, MLflow's (run links) or botocore's (INFO notices)
    assert ray_lines(first) == [], ray_lines(first)

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    listing = fs.ls(f"{bucket}/runs/s3run", detail=True)
    entries = [e["name"].split("/")[-1] for e in listing]
    ckpts = sorted(e["name"].split("/")[-1] for e in listing
                   if e["type"] == "directory" and "/checkpoint_" in e["name"])
    assert len(ckpts) == 2 and "teacher_backbone.safetensors" in entries
    assert fs.exists(f"{bucket}/runs/s3run/{ckpts[-1]}/manifest.json")
    assert fs.exists(f"{bucket}/runs/s3run/{ckpts[-1]}/state.pt")

    client, run = run_of(mlflow_server.tracking_uri, "s3run")
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == list(range(1, 17))
    for key in ("lr", "weight_decay", "momentum", "teacher_temp", "teacher_entropy",
                "teacher_kl_uniform", "images_per_sec", "step_time", "knn_top1"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["ray.num_workers"] == "2"
    assert run.data.tags["world_size"] == "2" and run.data.tags["git_revision"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "teacher_backbone.safetensors" in artifacts
    # rank 0's loop also logs the config, an attention picture per k-NN evaluation, system
    # metrics and the backbone's MLflow model (tests/test_mlflow_run.py reads them in full)
    assert {"config.yaml", "attention", "backbone"} <= set(artifacts), artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "attention")] == [
        "attention/step_0000008.png", "attention/step_0000016.png"]
    assert "MLmodel" in {a.path.rsplit("/", 1)[-1]
                         for a in client.list_artifacts(run.info.run_id, "backbone")}
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)

    # same run name, one more epoch: continues from the bucket at step 16; -v shows Ray's lines
    second = dino("-v", "train", *common, "train.epochs=3", env=env,
                  drop=("RAY_AUTH_TOKEN_PATH",))
    both = first.stdout + first.stderr + second.stdout + second.stderr
    assert re.search(rf"resumed from s3://{bucket}/runs/s3run/checkpoint_\S+ at epoch 2 step 16",
                     both), second.stdout[-3000:]
    assert "Reporting training result" in second.stdout + second.stderr  # -v: Ray's own lines
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == list(range(1, 25))  # no step repeated, none lost

    # ------------------------------------------------ the planted secrets, searched for
    found: dict[str, list[str]] = {"stdout/stderr": leaks(both)}
    sessions = list(ray_tmp.glob("ray/session_2*"))
    assert len(sessions) == 2, sessions  # each run's own local Ray, in our temp dir
    ray_files = list(_files(ray_tmp))
    assert any(p.suffix in (".log", ".out", ".err") for p in ray_files)
    for path in ray_files:
        if hit := leaks(path.read_bytes()):
            found[str(path.relative_to(ray_tmp))] = hit
    stored = fs.find(f"{bucket}/runs/s3run")
    assert any(p.endswith("config.yaml") for p in stored) and any("manifest" in p for p in stored)
    config = fs.cat_file(next(p for p in stored if p.endswith("config.yaml"))).decode()
    assert f"root: s3://{bucket}/runs" in config  # the search reads what it should
    for key in stored:
        if hit := leaks(fs.cat_file(key)):
            found[f"s3://{key}"] = hit
    _, run = run_of(mlflow_server.tracking_uri, "s3run")
    assert run.data.params["storage.root"] == root
    found["mlflow params"] = leaks(repr(run.data.params))
    found["mlflow tags"] = leaks(repr(run.data.tags))
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    downloaded = list(_files(local))
    assert downloaded  # at least the exported backbone
    for path in downloaded:
        if hit := leaks(path.read_bytes()):
            found[f"mlflow artifact {path.name}"] = hit
    for service in (mlflow_server, s3_server.service):  # the servers' own logs
        found[f"{service.name} server log"] = leaks(Path(service.log_file).read_bytes())
    found = {where: hit for where, hit in found.items() if hit}
    print(f"searched stdout/stderr, {len(ray_files)} Ray session files, {len(stored)} stored "
          f"objects, MLflow params/tags, {len(downloaded)} artifacts, 2 server logs")
    assert not found, f"planted secrets leaked: {found}"
