"""`dino submit` and `dino jobs`: training as a Ray job on a running cluster (token auth),
checkpoints in S3, metrics in MLflow, no secret in the job's info; a job stopped; and the
trained backbone's embeddings of a folder written to S3 by an embed job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_service_train import TINY as SERVICE_TINY

from dino_core.data.procedural import write_image_folder
from service.cli.jobs import cluster_args
from service.cluster import jobs
from service.devtools import stack

REPO = Path(__file__).resolve().parents[1]
PLANTED = "planted-secret-5f0c1d9e"  # the submitter's AWS secret; must not reach the job

# the tiny run of test_service_train.py (8 steps per epoch of 16 images) on one worker
TINY = [*SERVICE_TINY, "ray.num_workers=1", "ray.cpus_per_worker=1"]


def dino(
    *args: str, env: dict | None = None, drop: tuple = (), timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", **(env or {})}
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, env={k: v for k, v in env.items() if k not in drop},
    )  # fmt: skip
    if check:
        assert out.returncode == 0, (
            f"dino {' '.join(args)}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        )
    return out


# ---- no cluster needed ------------------------------------------------------------------


def test_job_env_keeps_secrets_out_unless_asked():
    local = {
        "DINO_STORAGE": "s3://b/runs", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_ENDPOINT_URL": "http://s3:9000", "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
        "MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_PASSWORD": "p",
        "MLFLOW_TRACKING_USERNAME": "u", "RAY_AUTH_TOKEN": "r", "HOME": "/home/me",
    }  # fmt: skip
    assert jobs.job_env(local) == {
        "DINO_STORAGE": "s3://b/runs", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_ENDPOINT_URL": "http://s3:9000", "AWS_DEFAULT_REGION": "eu-west-1",
    }  # fmt: skip
    assert jobs.job_env(local, pass_secrets=True) == {
        **jobs.job_env(local),
        "AWS_ACCESS_KEY_ID": "AKIA",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    # the key id is no secret, but it goes only with its secret
    assert "AWS_ACCESS_KEY_ID" not in jobs.job_env({"AWS_ACCESS_KEY_ID": "AKIA"}, True)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI embeds a password"):
        jobs.job_env({"MLFLOW_TRACKING_URI": "https://me:pw@mlflow.example"})


def test_cluster_args_put_the_address_after_the_overrides():
    assert cluster_args("train", ["--preset", "quickstart", "optim.lr=1e-3"]) == [
        "train", "--preset", "quickstart", "optim.lr=1e-3", "ray.address=auto"]  # fmt: skip
    # `dino train a=1 --json b=2` is an argparse error, so not simply appended
    assert cluster_args("train", ["optim.lr=1e-3", "--json"]) == [
        "train", "optim.lr=1e-3", "ray.address=auto", "--json"]  # fmt: skip
    assert cluster_args("tune", ["--", "--num-samples", "2"]) == [
        "tune", "--num-samples", "2", "ray.address=auto"]  # fmt: skip
    with pytest.raises(ValueError, match="optim.lr"):  # a bad value fails before submitting
        cluster_args("train", ["optim.lr=-1"])


def test_an_embed_job_runs_on_its_cluster_and_bad_flags_fail_here():
    args = ["--checkpoint", "s3://b/runs/r", "--data", "/data/photos", "--out", "s3://b/emb"]
    assert cluster_args("embed", args) == ["embed", *args, "--address", "auto"]
    for flag in (["--address", "10.0.0.1:6379"], ["--num-cpus", "4"]):
        with pytest.raises(ValueError, match=f"{flag[0]} is not for a job"):
            cluster_args("embed", [*args, *flag])
    with pytest.raises(ValueError, match="--features must be one of"):
        cluster_args("embed", [*args, "--features", "mean"])


def test_address_and_auth_header(tmp_path):
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == jobs.DEFAULT_ADDRESS
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "http://head:8265/"}) == "http://head:8265"
    env = {"RAY_API_SERVER_ADDRESS": "http://api:8265", "RAY_ADDRESS": "http://head:8265"}
    assert jobs.resolve_address(None, env) == "http://api:8265"
    assert jobs.resolve_address("head:8265", env) == "http://head:8265"
    (tmp_path / "token").write_text("abc\n")
    env = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    assert jobs.auth_headers(env) == {"Authorization": "Bearer abc"}
    assert jobs.auth_headers({**env, "RAY_AUTH_TOKEN": "xyz"}) == {"Authorization": "Bearer xyz"}
    assert jobs.auth_headers({**env, "RAY_AUTH_MODE": "disabled"}) == {}


# ---- on a `ray start --head` cluster ----------------------------------------------------


# Ray's cluster-wide autoscaling coordinator: a detached actor (get_if_exists) that the first
# job to train on a cluster creates and every later job shares; it outlives its creator
SHARED_ACTORS = {"_AutoscalingCoordinatorActor"}


def _alive_actors(ray_head, ray_job_id: str) -> list[str]:
    """Class names of the job's live actors, from the dashboard's State API (Ray's shared
    coordinator left out)."""
    query = f"limit=1000&filter_keys=job_id&filter_predicates=%3D&filter_values={ray_job_id}"
    request = urllib.request.Request(f"{ray_head.dashboard_url}/api/v0/actors?{query}",
                                     headers=stack.auth_headers(ray_head))  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        actors = json.load(response)["data"]["result"]["result"]
    return [a["class_name"] for a in actors
            if a["state"] != "DEAD" and a["class_name"] not in SHARED_ACTORS]


@pytest.mark.integration
@pytest.mark.budget(300)  # 108 s alone, 127 s beside other files, the embed job included (2026-12-05)
def test_submit_train_job_then_stop_a_long_one_then_embed(ray_head, s3_server, mlflow_server,
                                                           tmp_path):
    import s3fs
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    bucket = s3_server.new_bucket("jobs")
    # The submitter's environment; the cluster's workers have their own S3 credentials
    # (the ray_head fixture's), so the job must run without the planted secret.
    local = {"DINO_STORAGE": f"s3://{bucket}/runs", "AWS_SECRET_ACCESS_KEY": PLANTED,
             "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri}  # fmt: skip
    address = ["--address", ray_head.dashboard_url]
    # before any job: a list of none says so (the session's cluster has had no job yet: no
    # other test submits one; was a cluster of its own in test_first_hour_runs)
    empty = dino("jobs", "list", *address).stdout.strip()
    assert empty == f"no jobs on {ray_head.dashboard_url}", empty
    # the long run goes first and trains beside the tiny one (1 CPU each of the cluster's 2):
    # its start-up overlaps the tiny job's instead of following it
    long_job = dino("submit", *address, "--no-wait", "train", "--preset", "quickstart", *TINY, "train.epochs=1000",
                    "run_name=stopped", env=local).stdout.strip().splitlines()[-1]  # fmt: skip
    t0 = time.monotonic()
    # by default `submit` follows the logs; its exit status is 0 only if the job SUCCEEDED
    submitted = dino("submit", *address, "train", "--preset", "quickstart", *TINY, "train.epochs=1", "run_name=submitted",
                     env=local, timeout=400, check=False)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    job = submitted.stdout.splitlines()[0]
    assert "[dino] done" in submitted.stdout
    print(f"tiny job: submit to SUCCEEDED in {elapsed:.1f} s")
    assert dino("jobs", "status", job, *address).stdout.startswith(f"{job}: SUCCEEDED")
    logs = dino("jobs", "logs", job, *address).stdout
    assert "[dino] done" in logs
    assert dino("jobs", "logs", job, "--follow", *address).stdout == logs  # ended: no waiting

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    assert fs.glob(f"{bucket}/runs/submitted/checkpoint_*")
    assert fs.exists(f"{bucket}/runs/submitted/teacher_backbone.safetensors")
    mlflow = MlflowClient(mlflow_server.tracking_uri)
    experiment = mlflow.get_experiment_by_name("dino").experiment_id
    runs = mlflow.search_runs([experiment], "tags.`dino.run_name` = 'submitted'")
    assert [r.info.status for r in runs] == ["FINISHED"]

    # the job's info as the dashboard shows it: settings yes, secrets no
    info = JobSubmissionClient(ray_head.dashboard_url, headers=stack.auth_headers(ray_head))
    info = info.get_job_info(job)
    env_vars = info.runtime_env["env_vars"]
    assert env_vars["DINO_STORAGE"] == local["DINO_STORAGE"]
    assert env_vars["MLFLOW_TRACKING_URI"] == mlflow_server.tracking_uri
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(env_vars)
    assert "ray.address=auto" in info.entrypoint
    shown = dino("jobs", "status", job, "--json", *address).stdout
    token = Path(ray_head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    for text in (json.dumps(info.runtime_env), json.dumps(info.metadata), info.entrypoint,
                 shown, logs):  # fmt: skip
        assert PLANTED not in text and token not in text

    # the long run, stopped while it trains: once its first checkpoint is in the bucket
    deadline = time.monotonic() + 180
    while not fs.glob(f"{bucket}/runs/stopped/checkpoint_*"):
        assert time.monotonic() < deadline, dino("jobs", "logs", long_job, *address).stdout
        time.sleep(2)
    ray_job_id = jobs.status(long_job, ray_head.dashboard_url).job_id
    print("long job's actors:", _alive_actors(ray_head, ray_job_id))
    assert _alive_actors(ray_head, ray_job_id)  # the Train controller and worker
    t1 = time.monotonic()  # without RAY_AUTH_MODE the CLI still sends the token itself
    stopped = dino("jobs", "stop", long_job, *address, drop=("RAY_AUTH_MODE",))
    assert stopped.stdout.strip() == f"{long_job}: STOPPED"
    print(f"long job: stopped in {time.monotonic() - t1:.1f} s")
    # gracefully: the driver's SIGTERM had the workers checkpoint the step in progress
    stop_logs = dino("jobs", "logs", long_job, *address).stdout
    m = re.search(r"stop requested: checkpoint of step (\d+) committed", stop_logs)
    assert m, stop_logs[-3000:]
    newest = sorted(p for p in fs.glob(f"{bucket}/runs/stopped/checkpoint_*/manifest.json"))[-1]
    assert json.loads(fs.cat_file(newest))["global_step"] == int(m.group(1))
    # and with it its actors
    deadline = time.monotonic() + 60
    while alive := _alive_actors(ray_head, ray_job_id):
        assert time.monotonic() < deadline, alive
        time.sleep(1)
    listed = dino("jobs", "list", *address).stdout
    assert f"{job}  SUCCEEDED" in listed and f"{long_job}  STOPPED" in listed

    # the tiny run's backbone embeds a folder (one the cluster's nodes see: this machine's)
    # into the bucket, as a job that joins the cluster rather than starting a Ray of its own
    write_image_folder(tmp_path / "photos", 12, 24, 3, 0, masks=False)
    embedded = dino("submit", *address, "embed", "--checkpoint", f"s3://{bucket}/runs/submitted",
                    "--data", str(tmp_path / "photos"), "--out", f"s3://{bucket}/emb",
                    env=local, timeout=300, check=False)  # fmt: skip
    assert embedded.returncode == 0, embedded.stdout[-4000:] + embedded.stderr[-4000:]
    assert "embedded 12 images" in embedded.stdout, embedded.stdout[-3000:]
    embed_job = embedded.stdout.splitlines()[0]
    assert "--address auto" in jobs.status(embed_job, ray_head.dashboard_url).entrypoint
    manifest = json.loads(fs.cat_file(f"{bucket}/emb/manifest.json"))
    assert manifest["complete"] and manifest["count"] == 12
    assert manifest["checkpoint"].startswith(f"s3://{bucket}/runs/submitted")
