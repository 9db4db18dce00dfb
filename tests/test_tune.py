"""A 3-trial grid sweep on a local Ray with S3 storage and an MLflow server, all trials at
once; the high-temperature trial collapses to the uniform output and is stopped and marked,
and the two healthy ones are ranked by k-NN."""

from __future__ import annotations

import json

import pytest
from test_service_train import TINY, dino

pytestmark = pytest.mark.integration


@pytest.mark.budget(480)
def test_sweep_grid_with_collapse(s3_server, mlflow_server):
    import s3fs
    from mlflow.tracking import MlflowClient

    bucket = s3_server.new_bucket("sweep")
    out = dino(
        "tune", *TINY, "run_name=tiny", f"storage.root=s3://{bucket}/runs",
        f"tracking.uri={mlflow_server.tracking_uri}", "ray.num_workers=1",
        "ray.cpus_per_worker=0.5", "train.epochs=2",
        "--name", "sw", "--max-concurrent", "3",
        # 0.9 makes the teacher's targets uniform: entropy ~ log K, a collapse
        "--param", "loss.teacher_temp=grid:0.04,0.05,0.9",
        # a second swept key (one value) makes the heat map's second axis
        "--param", "optim.momentum_teacher=grid:0.996", "--json",
        timeout=900,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rows = res["rows"]
    assert len(rows) == 3
    collapsed = [r for r in rows if r["status"].startswith("collapsed")]
    healthy = [r for r in rows if r["status"] == "ok"]
    assert {r["loss.teacher_temp"] for r in collapsed} == {0.9} and len(collapsed) == 1
    assert all("teacher entropy" in r["status"] for r in collapsed)
    assert len(healthy) == 2
    assert all(r["epochs"] == 1 for r in collapsed)  # stopped after the first report
    assert all(r["epochs"] == 2 for r in healthy)
    # best first, and the best is the healthy trial with the highest k-NN top-1
    assert rows[0]["status"] == "ok"
    assert rows[0]["knn_top1"] == max(r["knn_top1"] for r in healthy)

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    for r in rows:  # every trial's checkpoints are in the bucket
        ckpts = [p for p in fs.ls(f"{bucket}/runs/{r['run_name']}") if "/checkpoint_" in p
                 and not p.endswith(".json")]
        assert ckpts, r["run_name"]
    sweep_files = {p.split("/")[-1] for p in fs.ls(f"{bucket}/runs/sw")}
    assert {"results.csv", "objective_heatmap.png", "best_teacher_backbone.safetensors"} <= sweep_files

    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name("dino")
    parent = client.search_runs([exp.experiment_id], "tags.`dino.run_name` = 'sw'")[0]
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    assert sorted(float(c.data.params["loss.teacher_temp"]) for c in children) == [0.04, 0.05, 0.9]
    assert all(client.get_metric_history(c.info.run_id, "loss") for c in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "objective_heatmap.png"} <= artifacts
    assert parent.data.metrics["best_knn_top1"] == rows[0]["knn_top1"]
