"""The first-hour fixes that need a real run (issue 17): training while MLflow does not
answer, Ctrl-C, ``--json`` on stdout alone. (``dino jobs list`` on an empty cluster: in
test_submit, on the session's cluster before its first job.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_service_train import TINY

from service.devtools import stack

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _env(ray_tmp: Path) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}


@pytest.mark.budget(120)
def test_an_unreachable_mlflow_does_not_hold_training_and_json_is_stdout_alone(tmp_path,
                                                                               ray_tmp):
    """Item 1: a port nothing listens on. Training starts at once (the tracker buffers as in
    an outage mid-run); and with --json, stdout is one JSON document."""
    uri = f"http://127.0.0.1:{stack.free_port()}"
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "train", *TINY, "train.epochs=1",
         "train.max_steps=4", f"storage.root={tmp_path / 'runs'}", f"tracking.uri={uri}",
         "run_name=offline", "--json"], cwd=REPO, env=_env(ray_tmp), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(out.stdout)  # nothing else on stdout
    assert result["mlflow_run_id"] is None and result["checkpoint"]
    assert f"MLflow at {uri} unreachable at the start of the run" in out.stderr
    assert "metrics are buffered" in out.stderr and "[dino] done" in out.stderr
    assert re.search(r"\[dino\] epoch 1/1 step 4/4 loss", out.stderr)  # it trained
    print(f"\nunreachable MLflow: whole run {took:.0f} s (it waited ~250 s for MLflow before)")
    assert took < 150


@pytest.mark.budget(150)
def test_ctrl_c_says_how_to_resume_and_marks_the_mlflow_run_killed(tmp_path, ray_tmp):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "train", *TINY, "train.epochs=50",
         f"storage.root={root}", "run_name=stopme"], cwd=REPO, env=_env(ray_tmp),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "step 2/" in line:  # training for real
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text[-3000:]
    # printed lines lag the run: the first checkpoint (step 8) may already be saved, and
    # only then is there something to resume
    if list((root / "stopme").glob("checkpoint_*")):
        assert (f"dino: interrupted: run 'stopme' stopped; its checkpoints are in "
                f"{root / 'stopme'}. Resume it with the same command") in text, text[-3000:]
    else:
        assert ("dino: interrupted: run 'stopme' stopped before its first checkpoint: nothing "
                "was saved, and running it again starts from the beginning (step 0).") in text
    assert "Traceback" not in text
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("dino").experiment_id],
                             "tags.`dino.run_name` = 'stopme'")[0]  # fmt: skip
    assert run.info.status == "KILLED"
