"""Image retrieval and copy detection: the revisited AP/mAP, the E/M/H protocol, the safe
ground-truth loader, GeM and whitening, the procedural sets, the Copydays reader and
`dino eval retrieval|copydetect` end to end."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_core.data.copydays import ProceduralCopydays, read_copydays, strong_edit
from dino_core.data.instances import VIEWS, Instance, InstanceSet, render
from dino_core.data.roxford import RestrictedUnpickler, load_revisited, write_revisited
from dino_core.eval.copydetect import Whitening, copy_descriptor, copy_detection_map, gem
from dino_core.eval.ranking import (
    average_precision,
    compute_map,
    positive_positions,
    protocol_gnd,
    revisited_map,
)
from dino_core.eval.retrieval import multi_scale_features, rank_gallery
from dino_core.models.backbone import build_backbone


def naive_ap(ranking, positives, junk=()):
    """AP by walking the ranked list: junk dropped, then the trapezoid between the precision
    before and after each positive (precision 1 before the first result)."""
    kept = [g for g in ranking if g not in set(junk)]
    hits, ap = 0, 0.0
    for k, g in enumerate(kept, start=1):
        if g in set(positives):
            before = 1.0 if k == 1 else hits / (k - 1)
            hits += 1
            ap += (before + hits / k) / 2 / len(positives)
    return ap


# ---- AP and mAP ----------------------------------------------------------------------------

def test_ap_by_hand():
    # positives at ranks 1 and 3 of 5: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 19/24
    assert average_precision([0, 2], 2) == pytest.approx(19 / 24)
    ranking = np.array([7, 3, 5, 1, 2])
    assert average_precision(positive_positions(ranking, [7, 5]), 2) == pytest.approx(19 / 24)
    # junk at rank 2 is removed: the positives become ranks 1 and 2, a perfect list
    assert average_precision(positive_positions(ranking, [7, 5], [3]), 2) == pytest.approx(1.0)
    # [n, p, j, n, p]: without the junk (0 + 1/2)/4 + (1/3 + 1/2)/4 = 1/3; with it 0.2875
    ranking = np.array([0, 1, 2, 3, 4])
    assert average_precision(positive_positions(ranking, [1, 4], [2]), 2) == pytest.approx(1 / 3)
    assert average_precision(positive_positions(ranking, [1, 4]), 2) == pytest.approx(0.2875)
    # a positive never retrieved still counts in the recall denominator
    assert average_precision([0], 2) == pytest.approx(0.5)


def test_compute_map_and_precision_at_k_by_hand():
    ranks = np.array([[7, 0], [3, 1], [5, 2], [1, 3], [2, 4], [0, 5], [4, 6], [6, 7]])
    gnd = [{"ok": [7, 5], "junk": []}, {"ok": [1, 4], "junk": [2]}, {"ok": [], "junk": []}]
    with pytest.raises(ValueError, match="one column per query|n_queries=3"):
        compute_map(ranks, gnd)
    m, aps, pr, prs = compute_map(ranks, gnd[:2], kappas=[1, 5])
    assert aps.tolist() == pytest.approx([19 / 24, 1 / 3])
    assert m == pytest.approx((19 / 24 + 1 / 3) / 2)
    # query 0: positives at 1 and 3 -> P@1 = 1, P@5 = 2 / min(5, 3); query 1 (junk-free 2, 4)
    assert np.allclose(prs, [[1.0, 2 / 3], [0.0, 2 / 4]])
    assert pr.tolist() == pytest.approx([0.5, (2 / 3 + 0.5) / 2])
    # a query without positives is NaN and left out of the mean
    m3, aps3, _, _ = compute_map(np.c_[ranks, ranks[:, :1]], gnd, kappas=[1])
    assert np.isnan(aps3[2]) and m3 == pytest.approx(m)


def test_protocol_sets():
    g = [{"easy": [1, 2], "hard": [3], "junk": [4, 5]}]
    as_sets = {s: {k: sorted(v.tolist()) for k, v in protocol_gnd(g, s)[0].items()}
               for s in ("easy", "medium", "hard")}
    assert as_sets == {"easy": {"ok": [1, 2], "junk": [3, 4, 5]},
                       "medium": {"ok": [1, 2, 3], "junk": [4, 5]},
                       "hard": {"ok": [3], "junk": [1, 2, 4, 5]}}
    with pytest.raises(ValueError, match="setting must be one of"):
        protocol_gnd(g, "extreme")


@pytest.mark.parametrize("seed", range(5))
def test_revisited_map_matches_brute_force_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n_gallery, n_q = 30, 6
    ranks = np.stack([rng.permutation(n_gallery) for _ in range(n_q)], axis=1)
    gnd = []
    for _ in range(n_q):
        ids = rng.permutation(n_gallery)
        e, h, j = (int(x) for x in rng.integers(0, 5, 3))
        gnd.append({"easy": ids[:e].tolist(), "hard": ids[e : e + h].tolist(),
                    "junk": ids[e + h : e + h + j].tolist()})
    res = revisited_map(ranks, gnd, kappas=[1, 5])
    rules = {"easy": (["easy"], ["junk", "hard"]), "medium": (["easy", "hard"], ["junk"]),
             "hard": (["hard"], ["junk", "easy"])}
    for setting, (ok_keys, junk_keys) in rules.items():
        aps = []
        for q, g in enumerate(gnd):
            ok = [i for k in ok_keys for i in g[k]]
            if ok:
                aps.append(naive_ap(ranks[:, q].tolist(), ok, [i for k in junk_keys for i in g[k]]))
        if aps:
            assert res[setting]["map"] == pytest.approx(np.mean(aps))
        else:
            assert setting not in res


def test_revisited_map_with_ok_lists_and_bad_ground_truth():
    ranks = np.array([[0], [1], [2]])
    assert revisited_map(ranks, [{"ok": [1]}])["all"]["map"] == pytest.approx(0.5 * (0 + 0.5))
    with pytest.raises(ValueError, match="missing 'junk'"):
        revisited_map(ranks, [{"easy": [1], "hard": []}])


# ---- the ground-truth file ---------------------------------------------------------------

class Payload:
    """A class a malicious file could name."""

    def __reduce__(self):
        return (os.system, ("touch should-not-exist",))


def _gnd(n_gallery=6):
    return {"imlist": [f"g{i}" for i in range(n_gallery)], "qimlist": ["q0", "q1"],
            "gnd": [{"easy": np.array([0, 1]), "hard": [2], "junk": [], "bbx": [1.0, 2, 30, 40]},
                    {"easy": [3], "hard": np.array([], dtype=np.int64), "junk": [np.int64(4)],
                     "bbx": np.array([0.0, 0, 8, 8])}]}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_a_ground_truth_file(tmp_path, protocol):
    (tmp_path / "roxford5k").mkdir()
    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(_gnd(), f, protocol=protocol)
    rs = load_revisited(tmp_path, "roxford5k")
    assert rs.qimlist == ["q0", "q1"] and len(rs.imlist) == 6
    assert list(rs.gnd[0]["easy"]) == [0, 1] and list(rs.gnd[1]["junk"]) == [4]
    assert rs.query_box(1) == (0.0, 0.0, 8.0, 8.0)
    assert rs.image_path("g3") == tmp_path / "roxford5k" / "jpg" / "g3.jpg"


def test_restricted_unpickler_refuses_other_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    for evil, name in ((Payload(), "system"), ({"imlist": [Payload]}, "Payload")):
        path = tmp_path / "x" / "gnd_x.pkl"
        path.write_bytes(pickle.dumps(evil))
        with pytest.raises(ValueError, match=f"refusing to unpickle the global .*{name}"):
            load_revisited(tmp_path, "x")
    assert not (tmp_path / "should-not-exist").exists()
    import io

    with pytest.raises(ValueError, match="builtins.eval"):
        RestrictedUnpickler(io.BytesIO(b"cbuiltins\neval\n(S'1'\ntR.")).load()


def test_ground_truth_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="gnd_rparis6k.pkl"):
        load_revisited(tmp_path, "rparis6k")
    (tmp_path / "x").mkdir()
    bad = _gnd(n_gallery=4)  # junk index 4 is outside the gallery
    (tmp_path / "x" / "gnd_x.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match=r"gnd\[1\]\['junk'\] holds indices outside"):
        load_revisited(tmp_path, "x")
    (tmp_path / "x" / "gnd_x.pkl").write_bytes(pickle.dumps({"imlist": [], "gnd": []}))
    with pytest.raises(ValueError, match="no key 'qimlist'"):
        load_revisited(tmp_path, "x")


# ---- features ----------------------------------------------------------------------------

def test_gem_against_the_formula():
    x = torch.randn(2, 5, 3)
    naive = torch.empty(2, 3)
    for b in range(2):
        for d in range(3):
            vals = [max(float(x[b, n, d]), 1e-6) ** 4 for n in range(5)]
            naive[b, d] = (sum(vals) / 5) ** 0.25
    assert torch.allclose(gem(x, p=4), naive, atol=1e-6)
    # p = 1 on positive values is the mean; a large p approaches the max
    pos = x.abs() + 0.1
    assert torch.allclose(gem(pos, p=1), pos.mean(1), atol=1e-6)
    assert torch.allclose(gem(pos.double(), p=100), pos.amax(1).double(), rtol=0.02)


def test_copy_descriptor_is_cls_and_gem_of_patches():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", 8, 32, depth=1).eval()
    x = torch.randn(2, 3, 32, 32)
    d = copy_descriptor(vit, x)
    tokens = vit.forward_features(x)
    assert d.shape == (2, 2 * 192)
    assert torch.allclose(d[:, :192], tokens[:, 0]) and torch.allclose(d[:, :192], vit(x))
    assert torch.allclose(d[:, 192:], gem(tokens[:, 1:], 4))
    with pytest.raises(ValueError, match="needs a ViT"):
        copy_descriptor(torch.nn.Conv2d(3, 4, 3), x)


def test_whitening_gives_identity_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g)
    x = torch.randn(500, 8, generator=g) @ mix + 3.0  # correlated, off-centre
    w = Whitening(x, dim=8)
    y = w(x).double()
    cov = (y - y.mean(0)).T @ (y - y.mean(0)) / len(y)
    assert torch.allclose(y.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(cov, torch.eye(8, dtype=torch.float64), atol=1e-4)
    assert w.energy == pytest.approx(1.0)
    # fewer descriptors than dimensions: only the components with variance are kept
    assert Whitening(x[:5]).proj.shape == (4, 8)


def test_copy_detection_map_by_hand():
    db = torch.eye(4)
    q = torch.tensor([[1.0, 0.1, 0, 0], [0.2, 1.0, 0, 0], [0, 0, 0.5, 1.0]])
    m, aps = copy_detection_map(q, db, [[0], [0], [2]], top_k=4)
    # ranks 1, 2, 2: one positive at rank 2 scores the trapezoid (0 + 1/2) / 2
    assert aps.tolist() == pytest.approx([1.0, 0.25, 0.25])
    _, aps = copy_detection_map(q, db, [[0], [0], [2]], top_k=1)
    assert aps.tolist() == pytest.approx([1.0, 0.0, 0.0])  # beyond the top 1 counts as 0


def test_multi_scale_is_the_normalised_sum_over_scales():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", 8, 32, depth=1).eval()
    x = torch.randn(1, 3, 40, 48)
    got = multi_scale_features(vit, x)
    # the reference: sum, / 3, / norm of the batch, then l2-normalised again
    v = sum(vit(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
            if s != 1 else vit(x) for s in (1, 2 ** -0.5, 0.5))
    v = v / 3
    v = v / v.norm()
    assert torch.allclose(got, F.normalize(v, dim=1), atol=1e-5)
    assert torch.allclose(multi_scale_features(vit, x, [1.0]), F.normalize(vit(x), dim=1))
    q, gal = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)
    ranks = rank_gallery(q, gal)
    assert ranks.shape == (5, 2)
    assert ranks[:, 0].tolist() == sorted(range(5), key=lambda i: -float(gal[i] @ q[0]))


# ---- the procedural sets -----------------------------------------------------------------

def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_instance_set_is_deterministic_and_its_positives_are_the_query_object():
    a, b, c = (InstanceSet(3, 4, 2, image_size=32, seed=s) for s in (0, 0, 1))
    assert all(_same(a.query(i), b.query(i)) for i in range(3))
    assert all(_same(a.gallery(j), b.gallery(j)) for j in range(a.n_gallery))
    assert not _same(a.query(0), c.query(0))
    assert a.n_gallery == 3 * 3 + 2
    gnd = a.gnd()
    for i, g in enumerate(gnd):
        assert [a.owner(j) for j in g["easy"]] == [(i, 1), (i, 2)]
        assert [a.owner(j) for j in g["hard"]] == [(i, 3)]
        x0, y0, x1, y1 = g["bbx"]
        w, h = a.query(i).size
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert [a.owner(j)[0] for j in (9, 10)] == [-1, -1]  # distractors belong to no query
    with pytest.raises(IndexError):
        a.gallery(11)


def test_render_draws_the_instance_colour_and_pattern():
    inst = Instance("square", 1.0, (200.0, 30.0, 30.0), "stripes", (20.0, 20.0, 220.0), 2.0, 0.0)
    rng = np.random.default_rng(0)
    image, (x0, y0, x1, y1) = render(inst, VIEWS["query"], rng, (64, 64))
    px = np.asarray(image, dtype=np.float32)[int(y0) + 2 : int(y1) - 2, int(x0) + 2 : int(x1) - 2]
    near = lambda c: (np.abs(px - np.float32(c)).max(axis=-1) < 40).mean()  # noqa: E731
    # a stripe pattern: about half body colour, half pattern colour inside the box
    assert 0.25 < near(inst.colour) < 0.75 and 0.25 < near(inst.pattern_colour) < 0.75
    # hard views are smaller than easy ones (radius 0.3-0.45 vs 0.5-0.8 of the half side)
    areas = {v: np.mean([np.prod(np.subtract(render(inst, VIEWS[v], rng, (64, 64))[1][2:],
                                             render(inst, VIEWS[v], rng, (64, 64))[1][:2]))
                         for _ in range(3)]) for v in ("easy", "hard")}
    assert areas["hard"] < areas["easy"]


def test_procedural_copydays_is_deterministic_and_reads_back(tmp_path):
    a, b = ProceduralCopydays(3, 2, 2, image_size=32), ProceduralCopydays(3, 2, 2, image_size=32)
    assert a.n_queries > 0
    assert all(_same(a.query(q)[0], b.query(q)[0]) for q in range(a.n_queries))
    assert [a.query(q)[1] for q in range(a.n_queries)] == [0, 0, 1, 1, 2, 2]
    root = a.write(tmp_path / "cd")
    originals, blocks = read_copydays(root)
    assert [p.name for p in originals] == ["200000.jpg", "200100.jpg", "200200.jpg"]
    assert blocks[0].name == "strong" and blocks[0].positives == [[0], [0], [1], [1], [2], [2]]
    assert len(list((root / "distractors").iterdir())) == 2


def test_strong_edits_change_the_image():
    original = ProceduralCopydays(1, 1, 0, image_size=48).original(0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        copy, names = strong_edit(original, rng)
        assert 2 <= len(names) <= 4 and len(set(names)) == len(names)
        assert names[-1] == "jpeg" or "jpeg" not in names
        assert copy.mode == "RGB" and not _same(copy, original)


def test_copydays_reader_on_a_built_layout(tmp_path):
    def put(rel):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel)

    with pytest.raises(FileNotFoundError, match="original"):
        read_copydays(tmp_path)
    for rel in ("original/200000.jpg", "original/200100.jpg", "strong/200001.jpg",
                "strong/200002.jpg", "strong/200101.jpg", "jpegqual/5/200000.jpg",
                "jpegqual/5/200100.jpg", "crops/10/200000.jpg", "crops/10/200100.jpg",
                "jpegqual/50/200000.jpg", "jpegqual/50/200100.jpg"):
        put(rel)
    originals, blocks = read_copydays(tmp_path)
    assert [b.name for b in blocks] == ["strong", "jpegqual/5", "jpegqual/50", "crops/10"]
    assert blocks[0].positives == [[0], [0], [1]]  # 2000xx -> 200000.jpg, 2001xx -> 200100
    assert blocks[1].positives == [[0], [1]]
    put("strong/209901.jpg")  # block 2099 has no original
    with pytest.raises(ValueError, match="209901.jpg"):
        read_copydays(tmp_path)


# ---- the commands ------------------------------------------------------------------------

@pytest.fixture
def checkpoint(random_quickstart_checkpoint: str) -> str:
    return random_quickstart_checkpoint


def _run(capsys, argv):
    from service.cli import main

    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.budget(20)
def test_cli_retrieval_procedural_and_folder(checkpoint, tmp_path, capsys, one_torch_thread):
    base = ["eval", "retrieval", "--checkpoint", checkpoint, "--json", "--device", "cpu"]
    res = _run(capsys, [*base, "--weights", "random", "--instances", "4",
                        "--procedural-distractors", "3"])
    assert res["n_queries"] == 4 and res["n_gallery"] == 4 * 3 + 3 and res["image_size"] == 32
    assert {"map_easy", "map_medium", "map_hard"} <= res.keys()
    assert all(0 <= res[k] <= 100 for k in ("map_easy", "map_medium", "map_hard"))
    assert set(res["by_setting"]["medium"]["mp_at_k"]) == {"1", "5", "10"}

    # a folder whose positives are the queries themselves: any backbone ranks them first
    s = InstanceSet(3, 2, 3, image_size=32, seed=5)
    queries = [s.query(i) for i in range(3)]
    gallery = [s.gallery(3 + d) for d in range(3)] + queries  # distractors, then copies
    gnd = [{"easy": [3 + i], "hard": [], "junk": [], "bbx": [0, 0, 8, 8]} for i in range(3)]
    write_revisited(tmp_path, "toy5k", gallery, queries, gnd)
    res = _run(capsys, [*base, "--data", str(tmp_path), "--dataset", "toy5k", "--scales", "1"])
    assert res["map_easy"] == pytest.approx(100) and res["map_medium"] == pytest.approx(100)
    assert "map_hard" not in res  # no query has a hard positive
    from service.cli import main

    assert main([*base, "--data", str(tmp_path), "--dataset", "rparis6k"]) == 1
    assert "no ground truth" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "none")]) == 1
    assert "--data: no folder" in capsys.readouterr().err


@pytest.mark.budget(20)
def test_cli_copydetect_procedural_and_folder(checkpoint, tmp_path, capsys, one_torch_thread):
    base = ["eval", "copydetect", "--checkpoint", checkpoint, "--json", "--device", "cpu"]
    res = _run(capsys, [*base, "--weights", "random", "--originals", "4", "--copies", "1",
                        "--procedural-distractors", "6"])
    assert res["n_queries"] == 4 and res["n_originals"] == 4 and res["n_distractors"] == 6
    assert res["whitened"] and res["whitening_images"] == 6 and 0 <= res["map"] <= 100
    root = ProceduralCopydays(3, 1, 3, image_size=32, seed=1).write(tmp_path / "cd")
    for d in ("jpegqual/50", "crops/80"):  # exact copies of the originals: found first
        (root / d).mkdir(parents=True)
        for p in sorted((root / "original").iterdir()):
            (root / d / p.name).write_bytes(p.read_bytes())
    res = _run(capsys, [*base, "--data", str(root), "--no-whitening"])
    assert res["n_distractors"] == 3 and not res["whitened"]
    assert set(res["by_block"]) == {"strong", "jpegqual/50", "crops/80"}
    assert res["by_block"]["jpegqual/50"] == pytest.approx(100)
    assert res["map"] == res["by_block"]["strong"]


@pytest.mark.budget(30)
def test_cli_logs_both_metrics_to_the_checkpoints_mlflow_run(checkpoint, tmp_path, capsys,
                                                             one_torch_thread):
    from mlflow.tracking import MlflowClient

    from service.cli import main
    from service.tracking import MLflowTracker as Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    training = Tracker.start(uri, "dino", "quickstart", (tmp_path / "artifacts").as_uri())
    common = ["--checkpoint", checkpoint, "--mlflow", "--tracking-uri", uri, "--device", "cpu"]
    assert main(["eval", "retrieval", *common, "--instances", "2",
                 "--procedural-distractors", "1"]) == 0
    assert main(["eval", "copydetect", *common, "--originals", "2", "--copies", "1",
                 "--procedural-distractors", "3"]) == 0
    metrics = MlflowClient(uri).get_run(training.run_id).data.metrics
    assert {"eval_retrieval_map_easy", "eval_retrieval_map_medium", "eval_retrieval_map_hard",
            "eval_copydetect_map"} <= set(metrics)
    assert "map (" not in capsys.readouterr().out  # human-readable lines, no JSON asked
