"""The evaluation suite's acceptance on a real run: ``dino train --preset quickstart`` (local
Ray, its embedded defaults), then ``dino eval knn``, ``dino eval linear`` and ``dino attention
--jaccard`` of its teacher against a randomly initialised backbone of the same shape
(``--weights random``), the evaluations through the command line's entry point in this
process (six commands: ~1 minute of imports saved).

The margins are well inside what was measured (see the closing note of the evaluation issue):
on 2 CPU cores the quickstart sees ~25k crops, enough for shape features, not for a
converged backbone. The run is the README's first command itself, under Ray: trained in
process instead (the same loop, 2 threads, no Ray), its k-NN was 61.5% against 62.7%, too
close to the +6 margin over the random backbone's 55.7%.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import private_ray_tmpdir
from test_service_train import dino

from service.storage import checkpoints as ckpt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Iterator[str]:
    """The newest checkpoint of a quickstart run, trained exactly as the README's first command
    does (only the storage root, and with it MLflow's file, moved into the test's folder)."""
    root = tmp_path_factory.mktemp("quickstart")
    with private_ray_tmpdir() as ray_dir:
        out = dino("train", "--preset", "quickstart", f"storage.root={root / 'runs'}",
                   env={"RAY_TMPDIR": str(ray_dir)}, timeout=1200)
    found = ckpt.load_latest_valid(ckpt.checkpoint_dirs(str(root / "runs" / "quickstart")))
    assert found is not None and found[1]["global_step"] == 768, out.stdout[-3000:]
    print(out.stdout[-1500:])
    yield str(found[0])


def dino_json(capsys, *args: str) -> dict:
    from service.cli.main import main

    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def both(capsys, *args: str) -> tuple[dict, dict]:
    return dino_json(capsys, *args), dino_json(capsys, *args, "--weights", "random")


@pytest.mark.budget(720)
def test_knn_of_the_trained_teacher_is_far_above_a_random_backbone(quickstart, capsys):
    """(Its budget holds the quickstart's training, ~4 minutes: the module's fixture.)"""
    trained, random = both(capsys, "eval", "knn", "--checkpoint", quickstart, "--train",
                           "procedural", "--val", "procedural", "--image-size", "32", "--k",
                           "20", "--num-workers", "0")
    with capsys.disabled():
        print(f"\nk-NN top-1: trained {trained['top1']:.1f}%, random {random['top1']:.1f}%, "
              f"chance {100 / trained['num_classes']:.1f}%")
    # measured against the random backbone's 55.7%: 62.7% (2026-12-01), 61.0% (2026-12-03),
    # and 61.5% trained in process: a 768-step CPU run is not bit-reproducible from machine
    # to machine (multi-threaded kernels), so the margin sits below the lowest seen
    assert trained["top1"] >= random["top1"] + 4


@pytest.mark.budget(420)
def test_linear_probe_of_the_trained_teacher_is_far_above_a_random_backbone(quickstart, capsys):
    trained, random = both(capsys, "eval", "linear", "--checkpoint", quickstart, "--train",
                           "procedural", "--val", "procedural", "--image-size", "32",
                           "--epochs", "10", "--lr", "0.1", "--batch-size", "128",
                           "--n-last-blocks", "1", "--crop-scale", "0.5", "--num-workers", "0")
    with capsys.disabled():
        print(f"\nlinear top-1: trained {trained['top1']:.1f}%, random {random['top1']:.1f}%")
    # a 10-epoch probe at lr 0.1 (a third of the README's 30 epochs at lr 1.0, same gain):
    # 49.7% vs 39.2% on 2026-12-03's run, whose 30-epoch probe gave 54.7% vs 44.3% (and
    # 58.7% vs 43.8% on 2026-12-01's); at lr 1.0, 10 epochs left it unconverged (42.7 / 38.8)
    assert trained["top1"] >= random["top1"] + 6


@pytest.mark.budget(120)
def test_best_head_mask_jaccard_of_both_backbones_is_measured(quickstart, capsys):
    """The Jaccard read-out runs on the trained run and on a random backbone and gives one
    value per head in [0, 1]. Beating the random backbone is not asserted: the same preset's
    best head measured 0.394 and 0.349 (2026-12-01) but 0.046 under Ray and 0.136 in process
    (2026-12-03), against 0.099 for the random backbone; a 768-step CPU run's attention
    settles on the object or on the background (README, "Warm-up end point")."""
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
