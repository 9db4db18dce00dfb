"""What a training run leaves in its MLflow run, read back from a real ``mlflow server``: the
resolved config, an attention picture per in-training evaluation, system metrics, and the
backbone as a pyfunc model that loads, predicts the k-NN's features, is registered, and
answers on ``mlflow models serve``. In process (the loop Ray's workers run, one rank);
tests/test_service_train.py checks the same artifacts of a run under Ray."""

from __future__ import annotations

import json
import os
import secrets
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train_loop import TINY
from torch.utils.data import Subset

from dino_core.eval import extract_features
from dino_core.eval.attention_display import attention_sheet
from dino_core.interop.export import load_backbone
from service import data
from service.config import load_config
from service.devtools import stack
from service.tracking import MLflowTracker
from service.train.context import InProcessContext
from service.train.evaluation import ATTENTION_IMAGES
from service.train.exports import BACKBONE_FILE
from service.train.loop import Loop

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
EVAL = ["train.epochs=1", "eval.knn_every_epochs=1", "eval.procedural_train_size=32",
        "eval.procedural_val_size=16", "eval.image_size=16", "tracking.enabled=true"]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


@pytest.mark.budget(50)  # 19-24 s here (2026-12-05), 6-7 s of it the MLflow server's start
def test_a_run_logs_config_attention_system_metrics_and_a_served_registered_model(
        mlflow_server, tmp_path, monkeypatch, one_torch_thread):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    uri, tag = mlflow_server.tracking_uri, secrets.token_hex(4)
    name, model_name = f"filled-{tag}", f"dino-backbone-{tag}"  # the server outlives the test
    cfg = load_config(None, None, [*TINY, *EVAL, f"tracking.uri={uri}", f"run_name={name}",
                                   f"storage.root={tmp_path}", f"train.register_model={model_name}"])
    run_url = str(tmp_path / name)
    tracker = MLflowTracker.start(uri, cfg.tracking.experiment, name)
    loop = Loop(cfg, InProcessContext(run_url), run_url, tracker)
    loop.run()
    tracker.end()
    run_id, step = tracker.run_id, loop.state.global_step
    client = MlflowClient(uri)
    assert {"config.yaml", "attention", "backbone", BACKBONE_FILE} <= {
        a.path for a in client.list_artifacts(run_id)}

    # the resolved config, read back by load_config to the very config of the run
    config = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert load_config(None, config) == cfg

    # one picture per evaluation (one here: the epoch's end), of the backbone as it was then
    # (the exported one: no step after it) on the first images of the val split
    pictures = [a.path for a in client.list_artifacts(run_id, "attention")]
    assert pictures == [f"attention/step_{step:07d}.png"]
    picture = Image.open(client.download_artifacts(run_id, pictures[0], str(tmp_path)))
    assert picture.format == "PNG"
    backbone = load_backbone(Path(run_url, BACKBONE_FILE))
    loader = data.eval_loader(Subset(data.eval_datasets(cfg)[1], range(8)), 8, 0)
    images, *_ = next(iter(loader))
    expected_picture = attention_sheet(backbone, images[:ATTENTION_IMAGES])
    assert picture.size == expected_picture.size
    difference = np.abs(np.asarray(picture.convert("RGB"), np.int16)
                        - np.asarray(expected_picture, np.int16))
    assert difference.max() <= 1, difference.max()

    # system metrics: a run shorter than the 10 s sampling interval gets its end sample
    run = client.get_run(run_id)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system

    # registered: version 1 of a new name, from this run's model
    (version,) = client.search_model_versions(f"name='{model_name}'")
    assert (version.version, version.run_id) == ("1", run_id)
    assert version.source.endswith("/backbone") and run_id in version.source
    assert run.data.tags["dino.registered_model"] == f"{model_name}/1"

    # the pyfunc's embeddings are the k-NN's features of the exported backbone file
    expected, _ = extract_features(backbone, loader)
    x = images.numpy().astype(np.float32)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/backbone")
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 3, -1, -1)
    assert model.metadata.get_output_schema().inputs[0].shape == (-1, 192)  # ViT-Tiny's D
    np.testing.assert_allclose(model.predict(x), expected.numpy(), atol=1e-5)

    # and served: `mlflow models serve` on a free port answers /invocations the same
    port = stack.free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/backbone",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": path}  # the project, as installed
    url = f"http://127.0.0.1:{port}"
    pids, log = stack._start("mlflow-serve", cmd, tmp_path, env, f"{url}/ping", timeout=120)
    try:
        served = np.asarray(_post(f"{url}/invocations", {"inputs": x.tolist()})["predictions"])
    finally:
        stack.stop(stack.Service("mlflow-serve", url, log, pids))
    np.testing.assert_allclose(served, expected.numpy(), atol=1e-5)
