"""The evaluation suite's acceptance on a real run: the ``quickstart_dinov2`` preset trained
for 4 epochs by the real training loop in this process (``InProcessContext``: the facts here
are the evaluations', not Ray's; a local Ray's start-up and worker group cost ~25 s of the
suite), then ``dino eval knn``, ``dino eval linear`` and ``dino attention --jaccard`` of its
teacher against a randomly initialised backbone of the same shape (``--weights random``), the
evaluations through the command line's entry point in this process (six commands: ~1 minute
of imports saved). The recipe under Ray: test_shards_runs.py's two-worker run.

Why this run and not the README's first command (``--preset quickstart``, DINO v1, 12 epochs):
the v1 quickstart's 768 steps took ~6 minutes of the suite's 25 and beat the random backbone
by only 5-7 points of k-NN (61.0-62.7% against 55.7%); the same model with DINOv2's recipe is
further ahead after a third of the steps (measured 2026-12-03 on this run: k-NN 69.2% against
55.7%, a 5-epoch linear probe 56.5% against 33.8%, best-head mask Jaccard 0.293 against
0.099). The README's first command is run as such from a clean clone before each change
lands, and its figures are in the README.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from service.config import load_config
from service.storage import checkpoints as ckpt
from service.tracking import NullTracker
from service.train.context import InProcessContext
from service.train.loop import Loop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Iterator[str]:
    """The newest checkpoint of a 4-epoch quickstart_dinov2 run, the preset's settings but
    the storage root (and no MLflow: nothing here reads it)."""
    root = tmp_path_factory.mktemp("quickstart")
    cfg = load_config("quickstart_dinov2", None, ["train.epochs=4", "tracking.enabled=false",
                                                  f"storage.root={root / 'runs'}"])
    run_url = str(root / "runs" / cfg.run_name)
    Loop(cfg, InProcessContext(run_url, cfg.train.keep_last), run_url, NullTracker()).run()
    found = ckpt.load_latest_valid(ckpt.checkpoint_dirs(run_url))
    assert found is not None and found[1]["global_step"] == 256
    yield str(found[0])


def dino_json(capsys, *args: str) -> dict:
    from service.cli.main import main

    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def both(capsys, *args: str) -> tuple[dict, dict]:
    return dino_json(capsys, *args), dino_json(capsys, *args, "--weights", "random")


@pytest.mark.budget(420)
def test_knn_of_the_trained_teacher_is_far_above_a_random_backbone(quickstart, capsys):
    """(Its budget holds the run's training, ~2 minutes: the module's fixture.)"""
    trained, random = both(capsys, "eval", "knn", "--checkpoint", quickstart, "--train",
                           "procedural", "--val", "procedural", "--image-size", "32", "--k",
                           "20", "--num-workers", "0")
    with capsys.disabled():
        print(f"\nk-NN top-1: trained {trained['top1']:.1f}%, random {random['top1']:.1f}%, "
              f"chance {100 / trained['num_classes']:.1f}%")
    # measured: 69.2% against the random backbone's 55.7% (2026-12-03); a CPU run is not
    # bit-reproducible from machine to machine (multi-threaded kernels): the margin is 8
    assert trained["top1"] >= random["top1"] + 8


@pytest.mark.budget(240)
def test_linear_probe_of_the_trained_teacher_is_far_above_a_random_backbone(quickstart, capsys):
    trained, random = both(capsys, "eval", "linear", "--checkpoint", quickstart, "--train",
                           "procedural", "--val", "procedural", "--image-size", "32",
                           "--epochs", "5", "--lr", "0.1", "--batch-size", "128",
                           "--n-last-blocks", "1", "--crop-scale", "0.5", "--num-workers", "0")
    with capsys.disabled():
        print(f"\nlinear top-1: trained {trained['top1']:.1f}%, random {random['top1']:.1f}%")
    # a 5-epoch probe at lr 0.1: 56.5% against 33.8% on this run (2026-12-03; 10 epochs:
    # 54.0% against 39.2%, twice the time)
    assert trained["top1"] >= random["top1"] + 12


@pytest.mark.budget(120)
def test_best_head_mask_jaccard_of_both_backbones_is_measured(quickstart, capsys):
    """The Jaccard read-out runs on the trained run and on a random backbone and gives one
    value per head in [0, 1]. Beating the random backbone is not asserted: this run's best
    head measured 0.293 against 0.099 (2026-12-03), once; the v1 quickstart's spread from run
    to run was 0.046-0.394, its attention settling on the object or on the background
    (README, "Warm-up end point"), and this run's spread is not measured."""
    trained, random = both(capsys, "attention", "--checkpoint", quickstart, "--jaccard", "200")
    t, r = trained["jaccard"], random["jaccard"]
    with capsys.disabled():
        print(f"\nmask Jaccard best head: trained {t['best']:.3f} (head {t['best_head']}), "
              f"random {r['best']:.3f}; mean over heads {t['mean']:.3f} vs {r['mean']:.3f}")
    for res in (t, r):
        assert len(res["per_head"]) == 3 and 0 <= res["best_head"] < 3  # ViT-Tiny: 3 heads
        assert all(0.0 <= j <= 1.0 for j in res["per_head"])
        assert res["best"] == max(res["per_head"])
        assert res["mean"] == pytest.approx(sum(res["per_head"]) / 3)
