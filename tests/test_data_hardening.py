"""The data side against a hostile user (issue 27, data items): a file name that is not
UTF-8 in a pack, manifest counts that lie about a shard, a file given where a folder or a
packed dataset's prefix belongs, and Ctrl-C during a pack. All in this process, no Ray."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli.main import main
from service.config import FolderSource, UrlSource, load_config
from service.data import open_images, train_loader
from service.data.pack import pack
from service.data.shards import read_manifest
from service.data.stream import ShardStream
from service.errors import DataError

SHARD_MB = "0.005"  # ~3 of the 24 px PNGs below a shard


def write_pngs(root: Path, n: int, classes: int = 2) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    write_pngs(tmp_path / "imgs", 12)
    dest = tmp_path / "packed"
    pack(str(tmp_path / "imgs"), str(dest), shard_bytes=5_500, parallel=False)
    return dest


def set_shard_count(dest: Path, shard: int, count: int) -> tuple[str, int]:
    """Edits one shard's ``num_images`` in the manifest, as a user would by hand; returns the
    shard's name and its real count."""
    doc = json.loads((dest / "manifest.json").read_text())
    entry = doc["shards"][shard]
    real, entry["num_images"] = entry["num_images"], count
    (dest / "manifest.json").write_text(json.dumps(doc))
    return entry["name"], real


# ---------------------------------------------------------------- 1. names that are not UTF-8
def test_pack_skips_and_reports_a_file_name_that_is_not_utf8(tmp_path, capsys):
    write_pngs(tmp_path / "imgs", 4)
    good = tmp_path / "imgs" / "class0" / "img000.png"
    bad = os.path.join(os.fsencode(good.parent), b"bad\xff.png")
    with open(bad, "wb") as f:
        f.write(good.read_bytes())
    dest = tmp_path / "packed"
    assert main(["data", "pack", str(tmp_path / "imgs"), str(dest), "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable files skipped" not in out and "1 with a name that is not UTF-8" in out
    m = read_manifest(str(dest))
    assert m.num_images == 4 and m.skipped == 1
    report = json.loads((dest / "pack-report.json").read_text(encoding="utf-8"))
    [entry] = report["skipped"]
    assert entry["path"].endswith("class0/bad\\xff.png")  # readable, and valid UTF-8 JSON
    assert "not valid UTF-8" in entry["error"] and "rename" in entry["error"]


# ------------------------------------------------------------------ 2. manifest counts lie
def test_a_shard_with_fewer_images_than_its_manifest_entry_is_named_and_counted(packed, caplog):
    name, real = set_shard_count(packed, 0, 1000 + 3)
    ds = ShardStream(read_manifest(str(packed)), None, None, raw=True)
    with caplog.at_level(logging.WARNING):
        items = list(ds)  # every image once, in stored order
    assert sum(item is None for item in items) == 1000  # counted as unreadable
    assert sum(item is not None for item in items) == 12
    [line] = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert f"the manifest says {real + 1000} images, the shard holds {real}" in line


def test_a_shard_with_more_images_than_its_manifest_entry_is_named(packed, caplog):
    name, real = set_shard_count(packed, 0, 1)
    cfg = load_config(overrides=[f"data.path={packed}", "data.num_workers=0",
                                 "train.batch_size=1", "data.shuffle_buffer=1"])
    ds = ShardStream(read_manifest(str(packed)), None, None, shuffle_buffer=1, raw=True)
    with caplog.at_level(logging.WARNING):
        batches = list(train_loader(ds, cfg, 0, 1, 0, 0, False))
    assert sum(len(images) for images, _, _ in batches) == 12 - real + 1  # the plan's count
    [line] = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert f"the manifest says 1 images, the shard holds {real}" in line
    assert f"{real - 1} of its images are not used" in line


# ------------------------------------------------------------ 3. a file where a folder goes
def test_pack_of_one_file_says_it_is_a_file_not_a_folder(tmp_path, capsys):
    write_pngs(tmp_path / "imgs", 1)
    single = tmp_path / "imgs" / "class0" / "img000.png"
    assert main(["data", "pack", str(single), str(tmp_path / "out"), "--in-process"]) == 1
    err = capsys.readouterr().err.strip()
    assert "does not exist" not in err
    assert f"{single} is a file, not a folder: pack takes a folder (or URL prefix)" in err


def test_data_path_at_one_shard_names_the_packed_prefix(packed, tmp_path):
    from service.train.preflight import check_images

    shard = packed / "shard-000000.tar"
    cfg = load_config(overrides=[f"data.path={shard}"])
    with pytest.raises(DataError) as err:
        check_images(str(shard), FolderSource(str(shard)), cfg, "data.path")
    assert "does not exist" not in str(err.value)
    assert str(err.value) == (f"data.path={shard}: {shard} is one shard of the packed dataset "
                              f"{packed}: give the packed dataset's prefix, {packed}, which "
                              "reads every shard through its manifest")
    # any other file: what it is, not that it is missing
    (tmp_path / "one.png").write_bytes((packed.parent / "imgs/class0/img000.png").read_bytes())
    with pytest.raises(DataError, match=r"one.png is a file, not a folder of images"):
        open_images(FolderSource(str(tmp_path / "one.png")), None, 0, 0, cfg)
    # and a shard given to pack: it is packed already
    with pytest.raises(DataError, match=rf"one shard of the packed dataset {packed}, which is "
                                        rf"packed already: train on it with data.path={packed}"):
        pack(str(shard), str(tmp_path / "again"), parallel=False)


def test_a_url_at_one_object_is_a_file_not_a_folder():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/hardening/packed/manifest.json", b"{}")
    fs.pipe_file("/hardening/packed/shard-000000.tar", b"x")
    fs.pipe_file("/hardening/one.png", b"x")
    cfg = load_config()
    with pytest.raises(DataError, match=r"shard-000000.tar is one shard of the packed dataset "
                                        r"memory://hardening/packed"):
        open_images(UrlSource("memory://hardening/packed/shard-000000.tar"), None, 0, 0, cfg)
    with pytest.raises(DataError, match=r"memory://hardening/one.png is a file, not a folder"):
        open_images(UrlSource("memory://hardening/one.png"), None, 0, 0, cfg)


# ------------------------------------------------------------------------ 4. Ctrl-C in pack
def test_ctrl_c_during_pack_is_one_line_exit_130_and_the_rerun_finishes(tmp_path, capsys,
                                                                       monkeypatch):
    import service.data.pack as pack_module

    write_pngs(tmp_path / "imgs", 12)
    src, dest, clean = tmp_path / "imgs", tmp_path / "packed", tmp_path / "clean"
    decode, calls = pack_module.load_rgb, [0]

    def ctrl_c_at_the_fifth_image(f):
        calls[0] += 1
        if calls[0] == 5:  # past the first shard (2-3 images a shard)
            raise KeyboardInterrupt
        return decode(f)

    monkeypatch.setattr(pack_module, "load_rgb", ctrl_c_at_the_fifth_image)
    argv = ["data", "pack", str(src), str(dest), "--in-process", "--shard-mb", SHARD_MB]
    try:
        code = main(argv)
    except KeyboardInterrupt:  # left uncaught, it would stop pytest itself
        pytest.fail("Ctrl-C left `dino data pack` as a KeyboardInterrupt traceback")
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    said = re.fullmatch(rf"dino: interrupted: (\d+) of (\d+) shards \((\d+) images\) are "
                        rf"written under {dest}; rerun the same command to pack the rest and "
                        "write the manifest", err[0])
    assert said, err[0]
    done, total, images = map(int, said.groups())
    assert 0 < done < total and 0 < images < 5
    assert len(list(dest.glob("shard-*.tar"))) == done
    monkeypatch.setattr(pack_module, "load_rgb", decode)
    assert main(argv) == 0
    assert main(argv[:3] + [str(clean)] + argv[4:]) == 0
    assert read_manifest(str(dest)).shards == read_manifest(str(clean)).shards


def test_ctrl_c_before_any_shard_is_one_line_too(tmp_path, capsys, monkeypatch):
    import service.data.pack as pack_module

    def ctrl_c(src):
        raise KeyboardInterrupt  # while a large source is listed

    monkeypatch.setattr(pack_module, "list_source", ctrl_c)
    try:
        code = main(["data", "pack", str(tmp_path), str(tmp_path / "out"), "--in-process"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left `dino data pack` as a KeyboardInterrupt traceback")
    assert code == 130
    assert capsys.readouterr().err == (
        "dino: interrupted before a shard was packed, or while the manifest was written: "
        f"rerun the same command to pack into {tmp_path / 'out'}\n")
