"""The local stack: each server answers, and stopping it leaves none of its processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from service.devtools import stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]

# Runs with nothing but the variables `python -m service.stack up` prints.
CLIENT = """
import os, mlflow, ray, s3fs
from ray.job_submission import JobSubmissionClient

fs = s3fs.S3FileSystem()
path = os.environ["DINO_STORAGE"].removeprefix("s3://") + "/probe.txt"
fs.pipe(path, b"probe")
assert fs.cat(path) == b"probe"

mlflow.set_experiment("probe")
with mlflow.start_run():
    mlflow.log_metric("loss", 0.5)
    mlflow.log_text("hello", "note.txt")

assert JobSubmissionClient().list_jobs() == []

ray.init()
@ray.remote
def worker_env():
    return os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("MLFLOW_TRACKING_URI")
assert ray.get(worker_env.remote()) == (
    os.environ["AWS_ENDPOINT_URL"], os.environ["MLFLOW_TRACKING_URI"])
ray.shutdown()
"""


def _tree_pids(services: list[stack.Service]) -> set[int]:
    pids = set()
    for service in services:
        for pid in service.pids:
            try:
                root = psutil.Process(pid)
                pids |= {root.pid, *(c.pid for c in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
    return pids


def _running(pids: set[int]) -> list[int]:
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [pid for pid in pids if alive(pid)]


@pytest.mark.budget(30)
def test_s3_put_get(s3_server):
    import s3fs

    bucket = s3_server.new_bucket()
    # endpoint and credentials come from AWS_ENDPOINT_URL & co., as on a real cluster
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{bucket}/a/b.bin", b"\x00dino")
    assert fs.cat(f"{bucket}/a/b.bin") == b"\x00dino"
    assert fs.ls(f"{bucket}/a") == [f"{bucket}/a/b.bin"]


@pytest.mark.budget(30)
def test_s3_stop_leaves_no_process(tmp_path):
    s3 = stack.start_s3(tmp_path)
    urllib.request.urlopen(s3.endpoint_url, timeout=5).close()
    stack.stop(s3)
    assert stack.alive_pids(s3) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(s3.endpoint_url, timeout=5)


@pytest.mark.budget(90)
def test_mlflow_run_metric_and_proxied_artifact(mlflow_server, tmp_path):
    import s3fs
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    experiment_id = client.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "loss", 1.25, step=3)
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run_id)

    run = client.get_run(run_id)
    assert [(m.value, m.step) for m in client.get_metric_history(run_id, "loss")] == [(1.25, 3)]
    # the client talks HTTP only; the server writes to S3
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    local = client.download_artifacts(run_id, "note.txt", str(tmp_path / "down"))
    assert Path(local).read_text() == "hello"
    bucket = mlflow_server.extra["artifacts_destination"].removeprefix("s3://")
    stored = s3fs.S3FileSystem(skip_instance_cache=True).find(bucket)
    assert [p for p in stored if p.endswith(f"{run_id}/artifacts/note.txt")]


@pytest.mark.budget(120)
def test_ray_job_api_with_token(ray_head):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url, headers=stack.auth_headers(ray_head))
    assert isinstance(client.list_jobs(), list)
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=10)
    assert anonymous.value.code == 401


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A temp dir with a short path: Ray's socket paths must stay under 108 characters."""
    path = tempfile.mkdtemp(prefix="dino-ray-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.budget(180)
def test_up_down_through_state_file(tmp_path, short_tmp):
    """`up` in one process, a client with only the printed exports, `down` in another."""
    state = tmp_path / "stack"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "service.devtools.stack", *args, "--state-dir", str(state)]
        env = {**clean, "RAY_TMPDIR": short_tmp}  # keeps /tmp/ray/ray_current_cluster out
        return subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=check
        )

    out = cli("up").stdout
    services = stack.load(state)
    assert [s.name for s in services] == ["s3", "mlflow", "ray"]
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in out.splitlines()
        if line.startswith("export ")
    )
    assert {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DINO_STORAGE"} <= set(
        exports
    )
    pids = _tree_pids(services)
    address_file = Path(short_tmp, "ray", "ray_current_cluster")
    try:
        assert address_file.read_text() == services[-1].address
        client = subprocess.run(
            [sys.executable, "-c", CLIENT], env={**clean, **exports}, cwd=tmp_path,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr[-3000:]
        assert cli("up", check=False).returncode != 0  # one stack per state dir
        pids |= _tree_pids(services)  # with the workers the client's task started
    finally:
        cli("down")
    assert _running(pids) == []
    assert not (state / stack.STATE_FILE).exists()
    assert not address_file.exists()
