"""``dino embed`` (issue 26): the vectors equal the k-NN evaluation's features of the same
images and checkpoint; bad input is one ``dino:`` line before Ray; and, on the module's Ray
cluster, a job's Parquet parts and manifest (read back by pyarrow and Ray Data), an unreadable
image counted and listed, a job killed after its first part resumed with no duplicate and no
gap, ``--incremental`` adding only new images, a packed set in S3 embedded into S3, a plain folder
in S3 with its class labels, and ``dino neighbours`` over a job's vectors finding a planted
near-duplicate image."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_reliability_faults import kill_group
from test_service_train import dino

from dino_core.data.procedural import write_image_folder
from dino_core.eval import extract_features
from service import data
from service.cli.main import main
from service.embed import check_inputs, embed_files
from service.embed.decode import decode_files
from service.embed.output import read_manifest, write_manifest
from service.errors import ConfigError, StorageError
from service.evaluate.knn import labeled_split
from service.evaluate.settings import eval_settings
from service.models.backbones import eval_image_size, load_backbone

REPO = Path(__file__).resolve().parents[1]
MANIFEST_KEYS = {"format", "complete", "count", "dim", "features", "dtype", "checkpoint",
                 "data", "image_size", "settings", "parts", "skipped"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """48 procedural images (3 class folders, 24 px PNGs) and one that is not an image."""
    root = tmp_path_factory.mktemp("embed") / "imgs"
    write_image_folder(root, 48, 24, 3, 0, masks=False)
    (root / "01_square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def eval_features(checkpoint: str, path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """``key -> (feature, label)`` as ``dino eval knn`` computes them (its split, its side,
    its loader and ``extract_features``), keyed by the path relative to ``path``."""
    model, file_cfg = load_backbone(checkpoint)
    cfg = eval_settings(checkpoint, file_cfg).cfg
    ds = labeled_split(str(path), eval_image_size(None, cfg, model), cfg, True)
    feats, labels = extract_features(model, data.eval_loader(ds, 128, 0))
    keys = [os.path.relpath(p, path) for p, _ in ds.samples if not p.endswith("broken.png")]
    return {k: (f, int(y)) for k, f, y in zip(keys, feats.numpy(), labels.numpy())}


def rows(out: Path) -> tuple[list[str], list[int | None], np.ndarray]:
    """``(keys, labels, embeddings)`` of every part under ``out``, read with pyarrow."""
    manifest = json.loads((out / "manifest.json").read_text())
    tables = [pq.read_table(out / p["file"]) for p in manifest["parts"]]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    labels = [y for t in tables for y in t.column("label").to_pylist()]
    emb = [np.asarray(e, np.float32) for t in tables for e in t.column("embedding").to_pylist()]
    return keys, labels, np.stack(emb)


@pytest.mark.budget(10)  # 0.6 s measured
def test_embed_files_gives_the_knn_evaluation_features(random_quickstart_checkpoint, folder,
                                                       tmp_path, one_torch_thread):
    checked = check_inputs(random_quickstart_checkpoint, str(folder), str(tmp_path / "out"))
    expected = eval_features(random_quickstart_checkpoint, folder)
    keys = sorted(expected)
    got = embed_files(checked.plan.manifest, [str(folder / k) for k in keys])
    assert got.dtype == np.float32 and got.shape == (len(keys), checked.spec.dim)
    np.testing.assert_allclose(got, np.stack([expected[k][0] for k in keys]), atol=1e-5)
    # the other features: cls+mean starts with the same direction, the grid is the side's
    mean = check_inputs(random_quickstart_checkpoint, str(folder), str(tmp_path / "o2"),
                        "cls+mean")
    both = embed_files(mean.plan.manifest, [str(folder / keys[0])])[0]
    assert mean.spec.dim == 2 * checked.spec.dim
    cls = both[:checked.spec.dim] / np.linalg.norm(both[:checked.spec.dim])
    np.testing.assert_allclose(cls, expected[keys[0]][0], atol=1e-5)
    patch = check_inputs(random_quickstart_checkpoint, str(folder), str(tmp_path / "o3"),
                         "patch")
    side = checked.spec.image_size
    assert patch.spec.grid == (side // 8, side // 8) and patch.spec.dtype == "float16"


@pytest.mark.budget(10)  # 0.2 s measured
def test_bad_input_is_one_line_before_ray(random_quickstart_checkpoint, folder, tmp_path,
                                          capsys):
    complete = tmp_path / "complete"
    checked = check_inputs(random_quickstart_checkpoint, str(folder), str(complete))
    write_manifest(str(complete), {**checked.plan.manifest, "complete": True, "count": 48})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    good = ["--checkpoint", random_quickstart_checkpoint, "--data", str(folder)]
    cases = {
        "missing data": (["--checkpoint", random_quickstart_checkpoint, "--data",
                          str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "nowhere"),
        "bad checkpoint": (["--checkpoint", str(junk), "--data", str(folder), "--out",
                            str(tmp_path / "o")], "junk.safetensors"),
        "missing checkpoint": (["--checkpoint", str(tmp_path / "no-run"), "--data",
                                str(folder), "--out", str(tmp_path / "o")], "no-run"),
        "bad features": ([*good, "--out", str(tmp_path / "o"), "--features", "gem"],
                         "--features must be one of cls, cls+mean, patch"),
        "complete out": ([*good, "--out", str(complete)], "--incremental"),
    }
    for name, (argv, said) in cases.items():
        code = main(["embed", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0, name
        assert len(err) == 1 and err[0].startswith("dino: ") and said in err[0], (name, err)
    assert not (tmp_path / "o").exists()  # nothing was written for any of them


@pytest.mark.budget(10)  # 0.1 s measured
def test_embed_and_the_evaluations_take_one_image_size_rule(random_quickstart_checkpoint,
                                                            folder, tmp_path):
    model, cfg = load_backbone(random_quickstart_checkpoint)  # ViT-T/8, eval.image_size 32
    assert eval_image_size(None, cfg, model) == cfg.eval.image_size == 32  # the run's
    assert eval_image_size(None, None, model) == 224  # a file without run settings
    assert eval_image_size(8, cfg, model) == 8  # one patch is enough
    for side, said in ((0, "must be at least 1, got 0"),  # 0 is refused, not "the default"
                       (7, "--image-size 7 is smaller than one patch of the backbone (8 px)")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            eval_image_size(side, cfg, model)
    with pytest.raises(ConfigError, match="smaller than one patch"):  # the job's own check
        check_inputs(random_quickstart_checkpoint, str(folder), str(tmp_path), image_size=7)


# ------------------------------------------------------------------ on a Ray cluster
# The job is a Ray Data pipeline (CPU tasks and an actor pool): these need Ray. They share
# the module's cluster, which each `dino embed` joins with --address.


def ray_lines(run: subprocess.CompletedProcess) -> list[str]:
    """stderr lines that are not ours. Ray 2.60's core worker says of every actor of a Ray
    Data actor pool that it "has constructor arguments in the object store and max_restarts >
    0" (ray-project/ray#57733, an actor handle Ray Data passes; gone in later Ray): not ours
    to silence, so left out here."""
    return [ln for ln in run.stderr.splitlines() if not ln.startswith("[dino] ")
            and "constructor arguments in the object store" not in ln]


def embed(module_ray, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not check:
        return subprocess.run([sys.executable, "-m", "service.cli", "embed", *args,
                               "--address", module_ray.address], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    return dino("embed", *args, "--address", module_ray.address, timeout=300)


@pytest.mark.integration
@pytest.mark.budget(100)  # 25 s alone, 52.7 s in the two-lane suite (S3 and Ray included)
def test_the_job_writes_the_evaluation_features_to_parquet(random_quickstart_checkpoint,
                                                           folder, module_ray, tmp_path):
    out = tmp_path / "out"
    run = embed(module_ray, "--checkpoint", random_quickstart_checkpoint, "--data",
                str(folder), "--out", str(out), "--part-rows", "16")
    last = run.stdout.strip().splitlines()[-1]
    assert "embedded 48 images" in last and "1 unreadable skipped" in last, run.stdout
    assert ray_lines(run) == [], run.stderr  # quiet: only our lines
    assert "[dino] embed: 49/49 images" in run.stderr  # the progress line, at the end
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["complete"] is True and manifest["count"] == 48
    assert manifest["features"] == "cls" and manifest["dtype"] == "float32"
    assert [p["rows"] for p in manifest["parts"]] == [16, 16, 16]
    assert [s["key"] for s in manifest["skipped"]] == ["01_square/broken.png"]

    keys, labels, emb = rows(out)
    expected = eval_features(random_quickstart_checkpoint, folder)
    assert sorted(keys) == sorted(expected) and len(set(keys)) == 48
    assert labels == [expected[k][1] for k in keys]
    np.testing.assert_allclose(emb, np.stack([expected[k][0] for k in keys]), atol=1e-5)

    # Ray Data reads the parts back, in a process of its own: a ray.init with the cluster's
    # token settings stays in this process's Ray, and a later module's local Ray then fails
    # to start (CI: test_raydata's five tests, "Token authentication is enabled")
    read = subprocess.run([sys.executable, "-c", READ_BACK, module_ray.address, str(out)],
                          capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    back = json.loads(read.stdout.strip().splitlines()[-1])
    assert sorted(back["keys"]) == sorted(keys)
    assert set(back["widths"]) == {manifest["dim"]}


READ_BACK = """
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
rows = ray.data.read_parquet(sys.argv[2]).take_all()
print(json.dumps({"keys": [r["key"] for r in rows],
                  "widths": sorted({len(r["embedding"]) for r in rows})}))
"""


@pytest.mark.integration
@pytest.mark.budget(120)  # 36.7 s in the module, 78.6 s beside other files (2026-12-05); 96
# images since CI saw all 6 parts of 48 written before the kill landed
def test_a_job_killed_after_its_first_part_resumes_with_no_duplicate_or_gap(
        random_quickstart_checkpoint, module_ray, tmp_path):
    # 96 images at a side of 224 px (784 patches) in 24 parts of 4 rows: seconds of work
    # after the first part, so that the kill lands while most parts are still to come
    folder = tmp_path / "imgs"
    write_image_folder(folder, 96, 24, 3, 0, masks=False)
    args = ["--checkpoint", random_quickstart_checkpoint, "--data", str(folder),
            "--part-rows", "4", "--batch-size", "4", "--image-size", "224"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "embed", *args, "--out", str(killed),
         "--address", module_ray.address], cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (killed / "part-00000.parquet").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no part within 120 s"
        time.sleep(0.01)
    kill_group(proc)
    left = read_manifest(str(killed))
    parts = sorted(p.name for p in killed.glob("part-*.parquet"))
    assert left["complete"] is False and 1 <= len(parts) < 24, (left, parts)  # killed mid-job

    again = embed(module_ray, *args, "--out", str(killed))
    assert "resuming" in again.stderr and "embedded" in again.stdout
    keys, labels, emb = rows(killed)
    assert len(keys) == len(set(keys)) == 96  # no duplicate, no gap
    manifest = read_manifest(str(killed))
    # the rows of an uninterrupted job: embed_files computes them (the first test shows
    # that a job's rows are embed_files' and the evaluation's)
    expected = eval_features(random_quickstart_checkpoint, folder)
    assert sorted(keys) == sorted(expected) and labels == [expected[k][1] for k in keys]
    np.testing.assert_allclose(emb, embed_files(manifest, [str(folder / k) for k in keys]),
                               atol=1e-6)
    assert manifest["complete"] and manifest["count"] == 96
    assert sorted(p["file"] for p in manifest["parts"]) == sorted(
        p.name for p in killed.glob("part-*.parquet"))


@pytest.mark.integration
@pytest.mark.budget(70)  # 23.5 s in the module, 45.6 s beside other files (2026-12-05)
def test_incremental_embeds_only_the_new_images(random_quickstart_checkpoint, folder,
                                                module_ray, tmp_path):
    src = tmp_path / "grow"
    shutil.copytree(folder, src, ignore=shutil.ignore_patterns("broken.png", "00001*"))
    before = sorted(str(p.relative_to(src)) for p in src.rglob("*.png"))
    args = ["--checkpoint", random_quickstart_checkpoint, "--data", str(src), "--out",
            str(tmp_path / "out")]
    first = embed(module_ray, *args)
    assert f"embedded {len(before)} images" in first.stdout
    part0 = (tmp_path / "out" / "part-00000.parquet").read_bytes()

    refused = embed(module_ray, *args, check=False)
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(err) == 1 and "--incremental" in err[0], err

    for p in folder.rglob("00001*.png"):  # the images left out, as new files
        shutil.copy(p, src / p.relative_to(folder))
    added = embed(module_ray, *args, "--incremental")
    new = sorted(set(str(p.relative_to(src)) for p in src.rglob("*.png")) - set(before))
    assert new and f"embedded {len(new)} images" in added.stdout, added.stdout
    keys, _, _ = rows(tmp_path / "out")
    assert sorted(keys) == sorted(before + new) and len(keys) == len(set(keys))
    assert (tmp_path / "out" / "part-00000.parquet").read_bytes() == part0  # untouched
    assert read_manifest(str(tmp_path / "out"))["count"] == len(before) + len(new)


@pytest.mark.integration
@pytest.mark.budget(45)  # 29 s measured
def test_a_packed_set_in_s3_gives_patch_grids_in_s3(random_quickstart_checkpoint, folder,
                                                    module_ray, s3_server, tmp_path):
    import fsspec

    from service.data.pack import pack

    bucket = s3_server.new_bucket("embed")
    packed, out = f"s3://{bucket}/packed", f"s3://{bucket}/emb"
    pack(str(folder), packed, 2**14, parallel=False)
    run = embed(module_ray, "--checkpoint", random_quickstart_checkpoint, "--data", packed,
                "--out", out, "--features", "patch", "--part-rows", "20")
    assert "patch grids take 48 x 16 tokens x 192 x 2 bytes = 294.9 kB" in run.stderr, \
        run.stderr
    assert "embedded 48 images" in run.stdout and "0 unreadable skipped" in run.stdout
    manifest = read_manifest(out)
    assert manifest["dtype"] == "float16" and manifest["settings"]["grid"] == [4, 4]
    assert [p["rows"] for p in manifest["parts"]] == [20, 20, 8]
    fs = fsspec.filesystem("s3")
    tables = [pq.read_table(fs.open(f"{bucket}/emb/{p['file']}")) for p in manifest["parts"]]
    column = tables[0].schema.field("embedding").type
    assert pa.types.is_list(column) and pa.types.is_float16(column.value_type)
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert len(set(keys)) == 48 and all(k.endswith(".png") and len(k) == 13 for k in keys)
    labels = sorted(y for t in tables for y in t.column("label").to_pylist())
    assert labels == sorted(y for _, y in eval_features(random_quickstart_checkpoint,
                                                       folder).values())
    # each row is the grid of one of the folder's images, as embed_files computes it
    files = sorted(str(p) for p in folder.rglob("*.png") if p.name != "broken.png")
    local = embed_files(manifest, files)
    got = np.stack([np.asarray(e, np.float32) for t in tables
                    for e in t.column("embedding").to_pylist()])
    assert got.shape == (48, 16 * 192)
    nearest = np.abs(got[:, None, :] - local[None, :, :]).max(axis=2).min(axis=1)
    assert nearest.max() < 1e-3


@pytest.mark.integration  # the job is a Ray Data pipeline: on the module's Ray cluster
@pytest.mark.budget(45)  # 12 s in the module, 21 s alone (the cluster's start included)
def test_a_plain_folder_in_s3_is_embedded_with_its_class_labels(random_quickstart_checkpoint,
                                                               folder, module_ray, s3_server,
                                                               tmp_path):
    import fsspec

    bucket = s3_server.new_bucket("plain")
    fs = fsspec.filesystem("s3")
    picked = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")
                    if p.name != "broken.png")[::4]  # 12 images of the three classes
    for key in picked:
        fs.put_file(str(folder / key), f"{bucket}/imgs/{key}")
    url = f"s3://{bucket}/imgs/"
    run = embed(module_ray, "--checkpoint", random_quickstart_checkpoint, "--data", url,
                "--out", str(tmp_path / "out"), "--part-rows", "5")
    assert "embedded 12 images" in run.stdout and "0 unreadable skipped" in run.stdout, \
        run.stdout
    keys, labels, emb = rows(tmp_path / "out")
    assert sorted(keys) == picked and len(keys) == 12  # keys: paths below the prefix
    expected = eval_features(random_quickstart_checkpoint, folder)  # the local folder's
    assert labels == [expected[k][1] for k in keys] and set(labels) == {0, 1, 2}
    np.testing.assert_allclose(emb, np.stack([expected[k][0] for k in keys]), atol=1e-5)
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["data"] == url and [p["rows"] for p in manifest["parts"]] == [5, 5, 2]
    assert manifest["settings"]["classes"] == ["00_circle", "01_square", "02_triangle"]


@pytest.mark.integration  # moto's S3 server, in a process of its own
@pytest.mark.budget(10)  # 0.2 s in the module, 1.7 s alone (the S3 server's start included)
def test_an_object_gone_since_the_listing_is_skipped_and_an_outage_is_not(folder, s3_server,
                                                                          monkeypatch):
    import fsspec

    bucket = s3_server.new_bucket("gone")
    key = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))[0]
    fsspec.filesystem("s3").put_file(str(folder / key), f"{bucket}/imgs/{key}")
    batch = {"key": np.array([key, "00_circle/gone.png"], dtype=object),
             "label": np.array([0, 0])}
    (out,) = decode_files(batch, f"s3://{bucket}/imgs", 32)  # a decode task, in process
    assert list(out["key"]) == [key, "00_circle/gone.png"]
    assert out["error"][0] == "" and out["image"][0].any()
    assert out["error"][1].startswith("FileNotFoundError")  # listed, as a local file's is
    # storage that stays down is no unreadable image: the task fails (the job resumes later)
    from service.storage import retry

    with socket.socket() as closed:  # a port of ours that does not listen: refused at once
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: 9 s
        monkeypatch.setattr(retry, "_settings", retry.StorageSettings(retry_seconds=0.0))
        with pytest.raises(StorageError, match="storage.retry_seconds"):
            next(decode_files(batch, f"s3://{bucket}/imgs", 32))


@pytest.mark.integration  # the job is a Ray Data pipeline: on the module's Ray cluster
@pytest.mark.budget(40)  # 18 s in the module and alone, the cluster's teardown included
def test_neighbours_of_an_image_over_a_jobs_vectors_put_its_planted_copy_second(
        random_quickstart_checkpoint, module_ray, tmp_path):
    """40 distinct procedural images and one edited copy of one of them, embedded by the job
    with the random-weights checkpoint (ViT-T/8 at 32 px): tried on all 40 images of this
    set and of seed 0, each one's copy was its nearest other row, by a cosine margin of
    0.02 or more (image 7: 0.068), far above the 1e-5 that separates runs."""
    root = tmp_path / "imgs"
    write_image_folder(root, 40, 64, 3, 1, masks=False)
    query = sorted(root.rglob("*.png"))[7]
    # the copy: 6 levels brighter, re-encoded as JPEG at quality 70
    pixels = np.asarray(Image.open(query).convert("RGB"), np.int16) + 6
    copy = query.with_name(f"copy_{query.stem}.jpg")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(copy, quality=70)
    out = tmp_path / "out"
    embed(module_ray, "--checkpoint", random_quickstart_checkpoint, "--data", str(root),
          "--out", str(out))
    assert read_manifest(str(out))["count"] == 41
    # faiss (if installed) only in a process of its own: see tests/test_search.py
    run = dino("neighbours", "--embeddings", str(out), "--query", str(query), "-k", "5",
               "--json", timeout=120)
    doc = json.loads(run.stdout)
    assert doc["query"]["kind"] == "image"  # a file, embedded by embed_files
    found = [(n["key"], n["cosine"]) for n in doc["neighbours"]]
    assert [k for k, _ in found[:2]] == [query.relative_to(root).as_posix(),
                                         copy.relative_to(root).as_posix()], found
    assert found[0][1] == pytest.approx(1.0, abs=1e-5)  # the job's row of the same file
    assert found[1][1] < 0.999 and found[1][1] > found[2][1]  # an edit, yet the nearest
