"""Packed datasets: ``dino data pack`` (in this process) and the streaming reader: coverage
exactly once per epoch over ranks x loader processes, exact mid-epoch resume, damaged shards
skipped and counted. The Ray, S3 and training paths are in test_shards_runs.py."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.config import DinoConfig, ShardsSource, load_config, parse_source
from service.data import train_loader
from service.data.pack import pack
from service.data.shards import read_manifest, read_samples
from service.data.stream import ShardStream, cut, shard_order
from service.errors import DataError


def write_jpegs(root: Path, n: int, classes: int = 2, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(20, 48, size=2)
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.jpg", quality=80)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("src")
    write_jpegs(root / "imgs", 60)
    (root / "imgs" / "class0" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (root / "imgs" / "class1" / "empty.png").write_bytes(b"")
    dest = root / "packed"
    pack(str(root / "imgs"), str(dest), shard_bytes=6_000, parallel=False)
    return root / "imgs", dest


def keys_of(ds: ShardStream, cfg: DinoConfig, rank: int, world: int, epoch: int,
            skip: int = 0, streams: int | None = None) -> list[list[str]]:
    """The keys of every batch of one rank's epoch, through the real DataLoader."""
    loader = train_loader(ds, cfg, rank, world, epoch, skip, False, streams)
    return [[key_of(x) for x in images] for images, _, _ in loader]


def key_of(encoded: torch.Tensor) -> str:
    return str(hash(bytes(encoded.numpy())))


def config(packed_dir: Path, workers: int, batch: int = 8) -> DinoConfig:
    return load_config(overrides=[f"data.path={packed_dir}", f"data.num_workers={workers}",
                                  f"train.batch_size={batch}", "data.shuffle_buffer=5"])


def test_pack_writes_webdataset_shards_and_reports_unreadable(packed):
    src, dest = packed
    m = read_manifest(str(dest))
    assert m.num_images == 60 and m.skipped == 2 and m.classes == ("class0", "class1")
    assert len(m.shards) > 3  # 6 kB shards of ~1-5 kB images
    report = json.loads((dest / "pack-report.json").read_text())
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["broken.jpg", "empty.png"]
    # another tool reads the shards: webdataset itself
    import webdataset as wds

    urls = [str(dest / s.name) for s in m.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 60
    assert {int(s["cls"]) for s in samples} == {0, 1}
    assert all(s["jpg"][:3] == b"\xff\xd8\xff" for s in samples)
    assert parse_source(str(dest / "manifest.json")) == ShardsSource(str(dest / "manifest.json"))


def test_pack_resumes_what_is_missing_and_refuses_a_changed_source(packed, tmp_path):
    src, _ = packed
    dest = tmp_path / "p"
    first = pack(str(src), str(dest), shard_bytes=6_000, parallel=False)
    (dest / "manifest.json").unlink()
    (dest / ".pack" / "shard-000002.tar.json").unlink()
    (dest / "shard-000002.tar").unlink()
    again = pack(str(src), str(dest), shard_bytes=6_000, parallel=False)
    assert again.packed_now == 1
    assert again.manifest == first.manifest
    (src / "class0" / "late.jpg").write_bytes((src / "class0" / "img0000.jpg").read_bytes())
    try:
        with pytest.raises(DataError, match="changed since an earlier pack"):
            pack(str(src), str(dest), shard_bytes=6_000, parallel=False)
    finally:
        (src / "class0" / "late.jpg").unlink()


def test_cut_spans_shards_in_order():
    pieces = cut([5, 3, 4], [2, 0, 1], 2, 9)
    assert [(p.shard, p.start, p.stop) for p in pieces] == [(2, 2, 4), (0, 0, 5)]
    assert shard_order(10, 0, 1) != shard_order(10, 0, 2)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_every_image_once_per_epoch_over_ranks_and_loader_processes(packed, world, workers):
    _, dest = packed
    cfg = config(dest, workers, batch=4 * world)
    seen: list[str] = []
    for rank in range(world):
        ds = ShardStream(read_manifest(str(dest)), None, None, shuffle_buffer=5, raw=True)
        batches = keys_of(ds, cfg, rank, world, epoch=0)
        assert len(batches) == (60 // world) // (cfg.train.batch_size // world)
        seen += [k for b in batches for k in b]
    assert len(seen) == len(set(seen))  # never twice
    steps = (60 // world) // (cfg.train.batch_size // world)
    assert len(seen) == world * steps * (cfg.train.batch_size // world)  # all that fit batches
    assert 60 - len(seen) < cfg.train.batch_size


def test_epochs_differ_in_order(packed):
    _, dest = packed
    cfg = config(dest, 0)
    ds = ShardStream(read_manifest(str(dest)), None, None, shuffle_buffer=5, raw=True)
    assert keys_of(ds, cfg, 0, 1, epoch=0) != keys_of(ds, cfg, 0, 1, epoch=1)


@pytest.mark.parametrize("skip", [1, 2, 5])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(packed, skip):
    _, dest = packed
    cfg = config(dest, 2)
    ds = ShardStream(read_manifest(str(dest)), None, None, shuffle_buffer=5, raw=True)
    full = keys_of(ds, cfg, 1, 2, epoch=3)
    assert keys_of(ds, cfg, 1, 2, epoch=3, skip=skip) == full[skip:]


def test_decoded_items_have_labels_and_seeded_transforms(packed):
    _, dest = packed
    ds = ShardStream(read_manifest(str(dest)), lambda im: torch.rand(2), None)
    ds.configure(epoch=0, rank=0, world=1, batch=4, streams=1)
    a = [item for item in ds]
    b = [item for item in ds]
    assert len(a) == len(b) > 0
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert {y for _, y in a} == {0, 1}


def test_damaged_shards_are_skipped_named_and_counted(packed, tmp_path, caplog):
    _, dest = packed
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in dest.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    m = read_manifest(str(bad))
    truncated, flipped = m.shards[1], m.shards[3]
    data = (bad / truncated.name).read_bytes()
    (bad / truncated.name).write_bytes(data[: len(data) // 2])
    data = bytearray((bad / flipped.name).read_bytes())
    data[700] ^= 0xFF
    (bad / flipped.name).write_bytes(bytes(data))
    cfg = config(bad, 0, batch=4)
    ds = ShardStream(m, None, None, shuffle_buffer=5, raw=True)
    with caplog.at_level(logging.WARNING):
        loader = train_loader(ds, cfg, 0, 1, 0, 0, False)
        batches = list(loader)
    assert len(batches) == 60 // 4  # the same steps as an intact set
    missing = sum(n for _, _, n in batches)
    assert missing == truncated.num_images + flipped.num_images
    assert truncated.name in caplog.text and flipped.name in caplog.text
    # the damaged tar really is unreadable past its cut
    with open(bad / truncated.name, "rb") as f, pytest.raises(tarfile.ReadError):
        list(read_samples(f))


def test_not_a_packed_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a packed dataset"):
        read_manifest(str(tmp_path / "manifest.json"))
    os.makedirs(tmp_path / "x")
    (tmp_path / "x" / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not a dino-webdataset manifest"):
        read_manifest(str(tmp_path / "x"))


def test_evaluation_splits_read_packed_data_whole(packed):
    from dino_core.augment.per_image import eval_transform
    from service.data import eval_loader, eval_split, num_classes

    _, dest = packed
    cfg = config(dest, 0)
    split = eval_split(cfg, parse_source(str(dest)), True, eval_transform(16))
    assert num_classes(split) == 2
    batches = list(eval_loader(split, 16, 2))  # shards dealt to two loader processes
    labels = torch.cat([y for _, y, _ in batches])
    assert len(labels) == 60 and sorted(set(labels.tolist())) == [0, 1]
    assert batches and all(x.shape[1:] == (3, 16, 16) for x, _, _ in batches)


@pytest.mark.parametrize("size", [0, 1, 2, 7, 64])
def test_the_shuffle_buffer_is_bounded_and_loses_nothing(size):
    from service.data.stream import shuffled

    read = [0]

    def items():
        for i in range(300):
            read[0] += 1
            yield i

    out, ahead = [], 0
    for x in shuffled(items(), size, np.random.default_rng(0)):
        out.append(x)
        ahead = max(ahead, read[0] - len(out))
    assert sorted(out) == list(range(300))
    assert ahead <= max(size, 1)  # never more than the buffer read ahead
    assert (out != list(range(300))) == (size > 1)
