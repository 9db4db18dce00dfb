"""``dino neighbours`` and ``dino dedup`` (``service.search``) over embedding folders written
here with pyarrow as ``dino embed`` writes them: random unit vectors with planted
near-duplicates. The blocked torch search is checked against a naive full matrix, and faiss
against it. faiss runs only in subprocesses: a process that loads both faiss and pyarrow
aborts at exit 3-5% of the time (apache/arrow#34314), and a pytest worker must not."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from service.cli import search as search_cli
from service.errors import DataError, MissingExtraError
from service.search import find_duplicates, find_neighbours, load_embeddings
from service.search.engine import build_engine, resolve_index
from service.search.exact import TorchExact
from service.search.grid import PLACEHOLDER, TILE

N, DIM, SEED = 301, 48, 0
THRESHOLD = 0.95
# planted: (a, b) one near-duplicate pair, (c1, c2, c3) a chain: each next to the one before
# (cosine 0.97) but c1 and c3 apart (0.97^2 - sin^2 = 0.88 < 0.95)
PAIR = ("orig/a.png", "copy/a.png")
CHAIN = ("chain/1.png", "chain/2.png", "chain/3.png")
CLASSES = ["copy", "orig", "chain", "rand"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted_set(n: int = N, dim: int = DIM, seed: int = SEED
                ) -> tuple[list[str], list[int | None], np.ndarray]:
    """``n`` keys, labels (every 7th unlabelled) and vectors: random ones, then the plants."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng.standard_normal((n, dim)))
    keys = [f"rand/{i:04d}.png" for i in range(n)]
    labels: list[int | None] = [None if i % 7 == 0 else 3 for i in range(n)]
    a = vectors[10]
    vectors[11] = unit(a + 0.02 * unit(rng.standard_normal(dim)))  # cosine about 0.9998
    keys[10], keys[11], labels[10], labels[11] = PAIR[1], PAIR[0], 0, 1
    e1, e2 = unit(rng.standard_normal(dim)), unit(rng.standard_normal(dim))
    e2 = unit(e2 - (e2 @ e1) * e1)
    theta = np.arccos(0.97)
    for n_, row in enumerate((40, 41, 42)):
        vectors[row] = unit(np.cos(n_ * theta) * e1 + np.sin(n_ * theta) * e2)
        keys[row], labels[row] = CHAIN[n_], 2
    return keys, labels, vectors


def write_embeddings(out: Path, keys, labels, vectors, part_rows: int = 100,
                     features: str = "cls", dtype: str = "float32", data: str = "/nowhere",
                     **changes) -> Path:
    """A folder as ``dino embed`` writes it; ``changes`` edit the manifest (None: drop)."""
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for p, start in enumerate(range(0, len(keys), part_rows)):
        rows = slice(start, start + part_rows)
        flat = np.ascontiguousarray(vectors[rows], dtype=dtype).reshape(-1)
        n = len(keys[rows])
        table = pa.table({
            "key": pa.array(keys[rows], pa.string()),
            "label": pa.array(labels[rows], pa.int64()),
            "embedding": pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32) * vectors.shape[1]), pa.array(flat)),
        })
        pq.write_table(table, out / f"part-{p:05d}.parquet")
        parts.append({"file": f"part-{p:05d}.parquet", "rows": n})
    manifest = {"format": 1, "complete": True, "count": len(keys), "dim": vectors.shape[1],
                "features": features, "dtype": dtype, "checkpoint": "/runs/x", "data": data,
                "image_size": 32, "settings": {"weights": "teacher", "classes": CLASSES},
                "parts": parts, "skipped": [{"key": "bad.png", "error": "OSError: truncated"}]}
    for field, value in changes.items():
        if value is None:
            manifest.pop(field)
        else:
            manifest[field] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_embeddings(tmp_path_factory.mktemp("emb") / "out", *planted_set())


@pytest.fixture(autouse=True)
def engine_name(monkeypatch) -> str:
    """faiss hidden (``import faiss`` fails) in this process: the torch search."""
    monkeypatch.setitem(sys.modules, "faiss", None)
    return "torch"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="dino")
    search_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.fn(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.budget(8)
def test_a_key_is_its_own_first_neighbour_then_its_planted_duplicate(planted, engine_name,
                                                                     capsys):
    code, out, _ = run_cli(["neighbours", "--embeddings", str(planted), "--query", PAIR[0],
                            "-k", "5", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["engine"] == engine_name and doc["index"] == "flat"
    assert [n["key"] for n in doc["neighbours"][:2]] == [PAIR[0], PAIR[1]]
    assert doc["neighbours"][0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert doc["neighbours"][1]["cosine"] > 0.999 > doc["neighbours"][2]["cosine"]
    assert doc["neighbours"][1]["label"] == 0 and doc["neighbours"][1]["class_name"] == "copy"
    assert [n["rank"] for n in doc["neighbours"]] == [1, 2, 3, 4, 5]
    # the table: a header and one line a neighbour, the duplicate second
    code, out, _ = run_cli(["neighbours", "--embeddings", str(planted), "--query", PAIR[0],
                            "-k", "3"], capsys)
    lines = out.splitlines()
    assert lines[1].split() == ["rank", "key", "label", "cosine"] and len(lines) == 5
    assert lines[3].split()[:4] == ["2", PAIR[1], "0", "(copy)"]


@pytest.mark.budget(8)
@pytest.mark.parametrize("query_chunk,row_chunk", [(7, 13), (1000, 1000), (1, 301)])
def test_blocked_torch_search_equals_the_full_matrix(query_chunk, row_chunk):
    _, _, x = planted_set()
    q = x[::10]  # 31 queries
    full = q @ x.T  # the naive N x N computation, in one piece
    scores, ids = TorchExact(x, query_chunk, row_chunk).search(q, 9)
    naive_ids = np.argsort(-full, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(ids, naive_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(full, naive_ids, 1), atol=1e-6)
    i, j = TorchExact(x, query_chunk, row_chunk).pairs(0.3)
    every = x @ x.T
    ni, nj = np.nonzero(np.triu(every > 0.3, k=1))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(ni.tolist(), nj.tolist()))


_WITH_FAISS = """
import os, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_search import CHAIN, planted_set
from service.search import find_neighbours, load_embeddings
from service.search.engine import pairs_at_least, resolve_index, top_k
from service.search.exact import TorchExact
from service.search.faiss_index import FaissSearch

_, _, x = planted_set(n=517, dim=40, seed=3)
torch_engine, faiss_engine = TorchExact(x, 64, 100), FaissSearch(x, "flat")
for row in (0, 10, 41, 516):
    t_ids, t_cos = top_k(torch_engine, x, x[row], 12)
    f_ids, f_cos = top_k(faiss_engine, x, x[row], 12)
    assert t_ids[0] == row
    np.testing.assert_array_equal(t_ids, f_ids)
    np.testing.assert_array_equal(t_cos, f_cos)
    np.testing.assert_allclose(t_cos, np.sort(x @ x[row])[::-1][:12], atol=1e-6)
for threshold in (0.4, 0.5, 0.95):
    t, f = pairs_at_least(torch_engine, x, threshold), pairs_at_least(faiss_engine, x, threshold)
    for a, b in zip(t, f):
        np.testing.assert_array_equal(a, b)
    full = x.astype(np.float64) @ x.T.astype(np.float64)
    assert len(t[0]) == int(np.triu(full >= threshold, k=1).sum())
ivf = find_neighbours(load_embeddings({planted!r}), CHAIN[0], 3, "ivf")  # approximate
assert ivf.index == "ivf" and [n.key for n in ivf.neighbours[:2]] == list(CHAIN[:2])
assert resolve_index("auto", 1, 10**7) == "flat"  # one query: always exact
assert resolve_index("auto", 200_000, 200_000) == "ivf"
print("ok", flush=True)
os._exit(0)  # see the module's docstring
"""


@pytest.mark.budget(30)
def test_faiss_and_torch_give_the_same_neighbours_pairs_and_digits(planted):
    """faiss's flat index and the torch search: the same ids and digits, the same pairs; IVF
    finds the chain; ``auto`` is exact for one query. Then ``dino neighbours`` as a command
    with faiss: its JSON names faiss, and the process exits 0 (``main`` skips the teardown
    where faiss and pyarrow abort)."""
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", _WITH_FAISS.format(tests=tests,
                                                                   planted=str(planted))],
                         capture_output=True, text=True, timeout=120)
    assert "No module named 'faiss'" not in out.stderr, "pip install -e '.[dev]' (faiss-cpu)"
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]
    cli = subprocess.run([sys.executable, "-m", "service.cli", "neighbours", "--embeddings",
                          str(planted), "--query", PAIR[0], "-k", "3", "--json"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert cli.returncode == 0, cli.stderr[-3000:]
    doc = json.loads(cli.stdout)
    assert doc["engine"] == "faiss" and [n["key"] for n in doc["neighbours"][:2]] == list(PAIR)


@pytest.mark.budget(8)
def test_dedup_finds_exactly_the_planted_pairs_and_one_group_for_a_chain(planted, engine_name,
                                                                           capsys, tmp_path):
    res = find_duplicates(load_embeddings(str(planted)), THRESHOLD)
    assert res.engine == engine_name and res.exact
    assert {(p.a, p.b) for p in res.pairs} == {(PAIR[1], PAIR[0]), (CHAIN[0], CHAIN[1]),
                                               (CHAIN[1], CHAIN[2])}
    assert res.groups == [list(CHAIN), [PAIR[1], PAIR[0]]]
    assert [p.group for p in res.pairs] == [1, 0, 0]  # the closest pair first
    code, out, err = run_cli(["dedup", "--embeddings", str(planted), "--threshold", "0.95",
                              "--json", "--out", str(tmp_path / "pairs.csv")], capsys)
    doc = json.loads(out)
    assert code == 0 and len(doc["pairs"]) == 3 and doc["groups"] == res.groups
    assert "3 pairs with cosine >= 0.95, 2 groups holding 5 rows (3 removable" in err
    rows = list(csv.DictReader((tmp_path / "pairs.csv").open()))
    assert [(r["a"], r["b"], int(r["group"])) for r in rows] == [
        (p.a, p.b, p.group) for p in res.pairs]
    # the chain's ends are 0.88 apart: at 0.85 they pair too, still one group
    low = find_duplicates(load_embeddings(str(planted)), 0.85)
    assert (CHAIN[0], CHAIN[2]) in {(p.a, p.b) for p in low.pairs}
    assert list(CHAIN) in low.groups


@pytest.mark.budget(8)
def test_patch_features_are_refused_naming_the_setting_and_float16_rows_are_read(tmp_path):
    keys, labels, x = planted_set(n=50)
    out = write_embeddings(tmp_path / "p", keys, labels, x, features="patch", dtype="float16")
    with pytest.raises(DataError, match=r"features='patch'.*dino embed --features cls"):
        load_embeddings(str(out))
    half = write_embeddings(tmp_path / "h", keys, labels, x, dtype="float16")  # cls in float16
    assert [n.key for n in find_neighbours(load_embeddings(str(half)), PAIR[0], 2).neighbours
            ] == list(PAIR)


@pytest.mark.budget(8)
@pytest.mark.parametrize("changes,named", [
    ({"dim": None}, "dim: Field required"),
    ({"dim": "48"}, "dim: Input should be a valid integer"),
    ({"features": "cls+max"}, "features: Input should be"),
    ({"complete": "yes"}, "complete: Input should be a valid boolean"),
    ({"owner": "me"}, "owner: Extra inputs are not permitted"),
    ({"parts": [{"file": "../../etc/passwd", "rows": 50}]}, "parts.0.file: String should match"),
    ({"count": 49}, "count: 49 but the parts hold 50 rows"),
    ({"format": 2}, "format: Input should be 1"),
    ({"complete": False}, "complete: false: the `dino embed` job has not finished"),
])
def test_a_forged_or_unfinished_manifest_is_refused_naming_the_field(tmp_path, changes, named):
    keys, labels, x = planted_set(n=50)
    out = write_embeddings(tmp_path / "f", keys, labels, x, **changes)
    with pytest.raises(DataError, match="manifest.json") as err:
        load_embeddings(str(out))
    assert named in str(err.value)


@pytest.mark.budget(8)
def test_a_part_that_disagrees_with_its_manifest_is_refused(tmp_path):
    keys, labels, x = planted_set(n=50)
    out = write_embeddings(tmp_path / "d", keys, labels, x, dim=47)
    with pytest.raises(DataError, match="part-00000.parquet: an embedding is not of 47 values"):
        load_embeddings(str(out))


@pytest.mark.budget(8)
def test_the_grid_has_the_query_and_k_tiles_with_placeholders_for_unreadable_images(
        tmp_path, capsys):
    keys, labels, x = planted_set()
    data = tmp_path / "images"
    for key, colour in ((PAIR[0], (250, 0, 0)), (PAIR[1], (0, 0, 250))):
        (data / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(data / key)
    out = write_embeddings(tmp_path / "g", keys, labels, x, data=str(data))
    grid = tmp_path / "grid.png"
    code, out_text, err = run_cli(["neighbours", "--embeddings", str(out), "--query", PAIR[0],
                                   "-k", "4", "--grid", str(grid)], capsys)
    assert code == 0 and f"wrote the grid of 5 images to {grid}" in err
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width == 5 * TILE
        rgb = image.convert("RGB")
        centre = [rgb.getpixel((t * TILE + TILE // 2, TILE // 2 - 15)) for t in range(5)]
    # the query (red), itself first (red), its duplicate (blue), 2 random keys without a file
    assert centre == [(250, 0, 0), (250, 0, 0), (0, 0, 250), PLACEHOLDER, PLACEHOLDER]


@pytest.mark.budget(8)
def test_an_image_query_is_embedded_with_the_manifest(planted, monkeypatch, tmp_path, capsys):
    image = tmp_path / "new.png"
    Image.new("RGB", (8, 8)).save(image)
    calls = []
    x = planted_set()[2]

    def embed_files(manifest, paths):  # the vector of a near copy of chain/2
        calls.append((manifest, paths))
        return (x[41] + 0.01 * x[0])[None, :] * 3  # not unit: search normalises it

    fake = types.ModuleType("service.embed.compute")
    fake.embed_files = embed_files  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "service.embed.compute", fake)
    code, out, _ = run_cli(["neighbours", "--embeddings", str(planted), "--query", str(image),
                            "-k", "3", "--json"], capsys)
    doc = json.loads(out)
    assert calls[0][1] == [str(image)] and calls[0][0]["checkpoint"] == "/runs/x"
    assert doc["query"] == {"text": str(image), "kind": "image", "location": str(image)}
    assert doc["neighbours"][0]["key"] == CHAIN[1] and doc["neighbours"][0]["cosine"] > 0.999
    with pytest.raises(DataError, match="neither a key of .* nor an image file"):
        find_neighbours(load_embeddings(str(planted)), str(tmp_path / "missing.png"), 3)


@pytest.mark.budget(8)
def test_ivf_without_faiss_names_the_extra_and_flat_does_not_need_it(planted):
    emb = load_embeddings(str(planted))  # faiss hidden here (the module's fixture)
    assert resolve_index("auto", 200_000, 200_000) == "flat"
    assert isinstance(build_engine(emb.vectors, "flat"), TorchExact)
    with pytest.raises(MissingExtraError, match=r"--index ivf needs faiss.*dino-service\[search\]"):
        find_neighbours(emb, CHAIN[0], 3, "ivf")


def memory_copy(folder, prefix: str):
    """``folder``'s files under ``memory://<prefix>``: fsspec's in-memory filesystem, which
    stands for a bucket (the same calls as s3:// makes); returns that filesystem."""
    fs = fsspec.filesystem("memory")
    for f in folder.iterdir():
        fs.pipe_file(f"/{prefix}/{f.name}", f.read_bytes())
    return fs


@pytest.mark.budget(8)
def test_embeddings_are_read_from_object_storage_urls(tmp_path):
    """fsspec's in-memory filesystem stands for a bucket: the same calls as s3:// makes."""
    keys, labels, x = planted_set(n=50)
    fs = memory_copy(write_embeddings(tmp_path / "e", keys, labels, x, part_rows=20),
                     "search-test/e")
    try:
        emb = load_embeddings("memory://search-test/e")
        assert emb.keys == keys and len(emb.manifest.parts) == 3
        res = find_neighbours(emb, PAIR[0], 2)
        assert [n.key for n in res.neighbours] == [PAIR[0], PAIR[1]]
    finally:
        fs.rm("/search-test", recursive=True)


@pytest.mark.budget(8)
def test_a_missing_part_is_named_locally_and_in_object_storage(tmp_path, capsys):
    """A part listed in the manifest but gone: one DataError naming it, whether the folder is
    local (``open`` raises FileNotFoundError) or an object store's (the storage layer wraps
    its not-found in a StorageError); and ``dedup --out`` writes its CSV to a URL."""
    keys, labels, x = planted_set(n=50)
    folder = write_embeddings(tmp_path / "m", keys, labels, x, part_rows=20)
    fs = memory_copy(folder, "search-gone/m")
    try:
        code, _, err = run_cli(["dedup", "--embeddings", "memory://search-gone/m", "--out",
                                "memory://search-gone/pairs.csv"], capsys)
        assert code == 0 and "wrote 3 pairs to memory://search-gone/pairs.csv" in err
        rows = list(csv.DictReader(io.StringIO(fs.cat_file("/search-gone/pairs.csv").decode())))
        assert {(r["a"], r["b"]) for r in rows} == {(PAIR[1], PAIR[0]), CHAIN[:2], CHAIN[1:]}
        (folder / "part-00001.parquet").unlink()
        fs.rm_file("/search-gone/m/part-00001.parquet")
        for out in (str(folder), "memory://search-gone/m"):
            with pytest.raises(DataError, match="part-00001.parquet: listed in the manifest "
                                                "but missing"):
                load_embeddings(out)
    finally:
        fs.rm("/search-gone", recursive=True)
