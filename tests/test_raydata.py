"""``data.loader=ray_data`` ingest (``service.data.raydata``) on a real local Ray: packed
WebDataset shards, image folders and s3:// (moto) decoded by Ray Data tasks, the batches a
training worker takes, and Ray's equal split that Ray Train applies to ``datasets``."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import private_ray_tmpdir
from PIL import Image

from service.data.raydata import _Decode, count_images, ray_dataset, train_batches
from service.errors import DataError
from service.storage import upload_dir

SIZE = 32
COLOURS = {0: (220, 30, 30), 1: (30, 30, 220)}  # ant red, bee blue: a label keeps its image


def encoded(label: int, i: int, fmt: str = "JPEG") -> bytes:
    w, h = (40, 28) if i % 3 else (24, 36)  # non-square both ways
    out = io.BytesIO()
    Image.new("RGB", (w, h), COLOURS[label]).save(out, fmt)
    return out.getvalue()


def write_packed(root: Path, n: int = 40, per_shard: int = 20) -> Path:
    """A packed set as ``dino data pack`` writes it: tar shards and ``manifest.json``."""
    root.mkdir(parents=True)
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for i in range(start, min(n, start + per_shard)):
                ext = "png" if i % 5 == 0 else "jpg"
                for member, data in ((f"{i:09d}.{ext}", encoded(i % 2, i, ext.upper()
                                                                 .replace("JPG", "JPEG"))),
                                     (f"{i:09d}.cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        raw = (root / name).read_bytes()
        shards.append({"name": name, "num_images": min(n, start + per_shard) - start,
                       "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
    (root / "manifest.json").write_text(json.dumps(
        {"format": "dino-webdataset", "version": 1, "classes": ["ant", "bee"],
         "num_images": n, "shards": shards}))
    return root


def write_folder(root: Path, ants: int = 5, bees: int = 6) -> Path:
    """``ant/`` (JPEG), ``bee/`` (PNG) and one garbage ``bee/broken.jpg``."""
    for label, cls, count, ext in ((0, "ant", ants, "jpg"), (1, "bee", bees, "png")):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            fmt = "JPEG" if ext == "jpg" else "PNG"
            (root / cls / f"{i:03d}.{ext}").write_bytes(encoded(label, i, fmt))
    (root / "bee" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (root / "notes.txt").write_text("not an image, not listed")
    return root


def check_rows(rows: list[dict], n: int) -> None:
    """``n`` canvases, each the colour of its label."""
    assert len(rows) == n
    for row in rows:
        assert row["image"].shape == (3, SIZE, SIZE) and row["image"].dtype == np.uint8
        mean = row["image"].reshape(3, -1).mean(axis=1)
        assert np.abs(mean - COLOURS[int(row["label"])]).max() < 12, (mean, row["label"])


@pytest.fixture(scope="module")
def ray_local(s3_server) -> Iterator[None]:
    """One local Ray for the module; its workers inherit the S3 endpoint of ``s3_server``."""
    import ray

    with private_ray_tmpdir() as tmp:
        saved = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(tmp)
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield
        finally:
            ray.shutdown()
            if saved is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = saved


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    return write_packed(tmp_path_factory.mktemp("packed") / "set")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder") / "imgs")


@pytest.mark.integration
@pytest.mark.budget(90)
def test_packed_shards_give_every_image_with_its_label(ray_local, packed):
    rows = ray_dataset(str(packed), SIZE).take_all()
    check_rows(rows, 40)
    assert sorted(int(r["label"]) for r in rows) == [0] * 20 + [1] * 20
    assert count_images(str(packed)) == 40
    # one shard, named relative to the prefix; labels mapped by name onto another list
    rows = ray_dataset(str(packed), SIZE, shard_urls=["shard-000001.tar"],
                       classes=["bee", "ant"]).take_all()
    assert sorted(int(r["label"]) for r in rows) == [0] * 10 + [1] * 10


@pytest.mark.integration
@pytest.mark.budget(60)
def test_folder_labels_by_folder_and_drops_the_unreadable_file(ray_local, folder):
    rows = ray_dataset(str(folder), SIZE).take_all()
    check_rows(rows, 11)  # 12 listed, broken.jpg dropped; notes.txt never listed
    assert sorted(int(r["label"]) for r in rows) == [0] * 5 + [1] * 6
    assert count_images(str(folder)) == 12  # so: 1 skipped


@pytest.mark.budget(30)
def test_an_unreadable_image_is_skipped_with_a_warning_naming_it(folder, caplog):
    """The decode step alone, as Ray runs it in a task."""
    paths = [folder / "ant" / "000.jpg", folder / "bee" / "broken.jpg", folder / ".x.jpg"]
    batch = {"path": np.array([str(p) for p in paths], dtype=object),
             "bytes": np.array([encoded(0, 0), b"garbage", encoded(0, 0)], dtype=object)}
    with caplog.at_level(logging.WARNING, logger="service.data.raydata"):
        (out,) = _Decode(SIZE, ["ant", "bee"], None, str(folder))(batch)
    assert out["image"].shape == (1, 3, SIZE, SIZE) and out["label"].tolist() == [0]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"skipping unreadable image {folder / 'bee' / 'broken.jpg'}"]
    # a batch of unreadable files gives no batch at all (Ray cannot type an empty tensor)
    assert list(_Decode(SIZE, [], None, str(folder))({k: v[1:2] for k, v in batch.items()})) == []


@pytest.mark.budget(30)
def test_classes_the_given_list_lacks_fail_before_reading(folder, packed, monkeypatch):
    """...and before Ray Data is touched: its readers start a local Ray when none runs (this
    test did, and that Ray lived on beside the suite's later clusters)."""
    import ray.data

    def touched(*args, **kwargs):
        raise AssertionError("Ray Data was touched before the checks")

    monkeypatch.setattr(ray.data, "read_binary_files", touched)
    monkeypatch.setattr(ray.data, "read_webdataset", touched)
    with pytest.raises(DataError, match="bee"):
        ray_dataset(str(folder), SIZE, classes=["ant"])
    with pytest.raises(DataError, match="bee"):
        ray_dataset(str(packed), SIZE, classes=["ant"])
    with pytest.raises(DataError):
        ray_dataset(str(folder / "ant" / "missing"), SIZE)


@pytest.mark.integration
@pytest.mark.budget(60)
def test_train_batches_yields_exactly_steps_batches_or_fails(ray_local, packed):
    ds = ray_dataset(str(packed), SIZE).materialize()
    got = list(train_batches(ds, local_batch=8, steps=4))
    assert len(got) == 4
    for images, labels, skipped in got:
        assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == torch.uint8
        assert labels.shape == (8,) and labels.dtype == torch.int64 and skipped == 0
    assert len(list(train_batches(ds.iterator(), local_batch=8, steps=5))) == 5  # all 40
    with pytest.raises(DataError, match="ran out after 5 of 6 batches of 8"):
        list(train_batches(ds.iterator(), local_batch=8, steps=6))


@pytest.mark.integration
@pytest.mark.budget(60)
def test_equal_streaming_split_gives_each_worker_floor_of_rows(ray_local, folder):
    """What Ray Train's default DataConfig does with ``datasets={"train": ds}``: 11 readable
    images over 2 workers are 5 each, the 11th truncated."""
    splits = ray_dataset(str(folder), SIZE).streaming_split(2, equal=True)
    counts: list[int] = [0, 0]

    def consume(i: int) -> None:  # the iterators start an epoch together: one thread each
        counts[i] = sum(len(b["label"]) for b in splits[i].iter_torch_batches(batch_size=2))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert counts == [5, 5]


@pytest.mark.integration
@pytest.mark.budget(90)
def test_s3_packed_set_and_folder(ray_local, s3_server, packed, folder):
    bucket = s3_server.new_bucket("raydata")
    upload_dir(packed, f"s3://{bucket}/packed")
    upload_dir(folder, f"s3://{bucket}/imgs")
    rows = ray_dataset(f"s3://{bucket}/packed", SIZE).take_all()
    check_rows(rows, 40)
    assert count_images(f"s3://{bucket}/packed") == 40
    rows = ray_dataset(f"s3://{bucket}/imgs", SIZE).take_all()
    check_rows(rows, 11)
    assert sorted(int(r["label"]) for r in rows) == [0] * 5 + [1] * 6
