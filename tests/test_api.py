"""The Python API end to end, as a notebook would call it: ``api.train`` (in this process),
``api.embed`` (Ray Data on a cluster) of the trained run, ``api.knn`` of its checkpoint; the
k-NN of the embedded vectors equals the evaluation's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_train_loop import TINY

from dino_core import knn_classify
from dino_core.data.procedural import write_image_folder
from service import api
from service.train.exports import BACKBONE_FILE


def vectors(out: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``key -> vector`` and ``key -> label`` of an embed job's parts, read with pyarrow."""
    found, labels = {}, {}
    for part in sorted(Path(out).glob("part-*.parquet")):
        t = pq.read_table(part)
        for k, y, e in zip(*(t.column(c).to_pylist() for c in ("key", "label", "embedding"))):
            found[k], labels[k] = np.asarray(e, np.float32), y
    return found, labels


def as_split(out: str) -> tuple[torch.Tensor, torch.Tensor]:
    found, labels = vectors(out)
    keys = sorted(found)
    return (torch.from_numpy(np.stack([found[k] for k in keys])),
            torch.tensor([labels[k] for k in keys]))


# api.embed in a process of its own, as the notebook's next cell would be: a ray.init with the
# cluster's token settings stays in this process's Ray, and a later module's local Ray then
# fails to start (the clean-clone run of 2026-12-05: test_raydata's five tests)
EMBED = """
import json, sys
from service import api
job = api.embed(sys.argv[1], sys.argv[2], sys.argv[3], address=sys.argv[4], say=print)
print(json.dumps({"type": type(job).__name__, "embedded_now": job.embedded_now,
                  "count": job.manifest["count"], "complete": job.manifest["complete"]}))
"""


@pytest.mark.integration  # api.embed is a Ray Data job (decode tasks, an actor pool)
@pytest.mark.budget(120)  # 35 s beside other files in process (2026-12-05); 2 processes more
def test_train_embed_and_evaluate_through_the_api(module_ray, tmp_path):
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    write_image_folder(train_dir, 48, 24, 3, 0, masks=False)
    write_image_folder(val_dir, 24, 24, 3, 1, masks=False)
    said: list[str] = []
    overrides = {k: v for k, v in (o.split("=", 1) for o in TINY)}
    overrides.update({"train.epochs": 1, "storage.root": str(tmp_path / "runs"),
                      "run_name": "api"})
    run = api.train(None, overrides=overrides, in_process=True, say=said.append)
    assert isinstance(run, api.TrainResult) and run.run_name == "api"
    assert said and said[0].startswith("[dino] run 'api'") and "in this process" in said[0]
    assert run.checkpoint and Path(run.checkpoint, "manifest.json").is_file()
    assert run.backbone == str(Path(run.run_url, BACKBONE_FILE)) and Path(run.backbone).is_file()

    out = {}
    for split, folder in (("train", train_dir), ("val", val_dir)):
        out[split] = str(tmp_path / f"emb-{split}")
        done = subprocess.run([sys.executable, "-c", EMBED, run.run_url, str(folder), out[split],
                               module_ray.address], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        job = json.loads(done.stdout.strip().splitlines()[-1])
        n = len(list(folder.rglob("*.png")))
        assert job == {"type": "EmbedResult", "embedded_now": n, "count": n, "complete": True}

    knn = api.knn(run.checkpoint, str(train_dir), str(val_dir), ks=[5, 10], num_workers=0)
    assert isinstance(knn, api.EvalResult) and knn.kind == "knn"
    assert set(knn.metrics) == {"eval_knn_top1", "eval_knn_top5"}
    assert knn.details["n_train"] == 48 and knn.details["n_val"] == 24

    # the embedded vectors are the evaluation's features: the same k-NN figures
    (tr, ytr), (va, yva) = as_split(out["train"]), as_split(out["val"])
    assert torch.allclose(tr.norm(dim=1), torch.ones(len(tr)), atol=1e-5)
    again = knn_classify(tr, ytr, va, yva, ks=[5, 10], temperature=0.07, num_classes=3)
    for k in (5, 10):
        assert again[k]["top1"] == pytest.approx(knn.details["by_k"][str(k)]["top1"])
        assert again[k]["top5"] == pytest.approx(knn.details["by_k"][str(k)]["top5"])
    assert knn.metrics["eval_knn_top1"] == knn.details["by_k"]["10"]["top1"]
