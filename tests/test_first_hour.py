"""A new user's first hour (issue 17): every command ends in a result or one ``dino: ...``
line naming the input, with a non-zero exit code; what needs no cluster is found before Ray
is imported. Each test reproduces one reported input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from service.config import load_config
from service.tracking import NullTracker
from service.train.context import InProcessContext
from service.train.loop import Loop

REPO = Path(__file__).resolve().parents[1]
T = ["train.max_steps=8", "train.epochs=1", "eval.knn_every_epochs=0"]
SMALL = ["model.depth=1", "data.procedural_size=64", "data.num_workers=0",
         "tracking.enabled=false"]  # fmt: skip


def dino(*args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None,
         timeout: int = 300) -> tuple[int, str, str, set[str]]:
    """``(rc, stdout, stderr without the import log, modules imported)`` of ``dino ARGS``."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "service.cli", *args], cwd=cwd or REPO,
        capture_output=True, text=True, timeout=timeout,
        env={k: v for k, v in {**os.environ, "RAY_ADDRESS": "", **(env or {})}.items()
             if v is not None},  # None: unset
    )  # fmt: skip
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in out.stderr.splitlines()
                if ln.startswith("import time:")}
    err = "\n".join(ln for ln in out.stderr.splitlines() if not ln.startswith("import time:"))
    return out.returncode, out.stdout, err, imported


def one_line(rc: int, err: str, imported: set[str], code: int, *words: str) -> str:
    """The run failed with ``code`` and one ``dino:`` line holding ``words``, before Ray."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert rc == code and len(lines) == 1 and lines[0].startswith("dino"), (rc, err[-3000:])
    assert all(w in lines[0] for w in words), lines[0]
    assert not {m for m in imported if m == "ray" or m.startswith("ray.")}, "Ray was imported"
    return lines[0]


@pytest.fixture
def here(capsys, monkeypatch):
    """``dino ARGS`` in this process, through the command line's entry point: ``(rc, stdout,
    stderr)``. Ray must not start: the driver's ``init_ray`` fails the test if reached (the
    subprocess tests above check the stronger claim, that Ray is not even imported, for one
    case of each kind)."""
    from service.cli.main import main
    from service.train import driver

    started: list[str] = []

    def refuse(*args, **kwargs):
        started.append("init_ray")
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "init_ray", refuse)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        assert not started, "Ray was started"
        return rc, out, err

    return run


def _images(folder: Path, n: int = 4, classes: tuple[str, ...] = ("a",)) -> Path:
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (i * 40, 80, 0)).save(folder / c / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """A storage root with run ``quick``: the quickstart model (depth 1), 2 steps, in
    process; its checkpoint stores eval.image_size 32 and light-on-dark shapes."""
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("quickstart", overrides=[*SMALL, f"storage.root={root}", "run_name=quick",
                                               "train.max_steps=2", "eval.knn_every_epochs=0"])
    Loop(cfg, InProcessContext(str(root / "quick")), str(root / "quick"), NullTracker()).run()
    return root


# ---------------------------------------------------------------------------- 3: unreadable data


@pytest.mark.budget(25)
def test_a_folder_of_unreadable_files_fails_before_ray(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i}.jpg").write_bytes(os.urandom(500))
    rc, _, err, imported = dino("train", "--preset", "quickstart", *T, f"data.path={folder}",
                                f"storage.root={tmp_path / 'runs'}")
    one_line(rc, err, imported, 1, f"data.path={folder}", "32 of 32 sampled image files",
             "data.max_unreadable_fraction=0.5")


def test_five_corrupt_files_are_called_unreadable_not_too_few(tmp_path, here):
    folder = tmp_path / "five"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(b"not a jpeg")
    rc, _, err = here("train", "--preset", "quickstart", *T, f"data.path={folder}",
                      f"storage.root={tmp_path / 'runs'}")
    line = one_line(rc, err, set(), 1, "5 of 5 sampled image files could not be read")
    assert "fewer than one global batch" not in line


def test_the_loop_stops_when_most_images_turn_out_unreadable(tmp_path, one_torch_thread):
    """Past the preflight's sample (the loop is run directly here), the loop's own count stops
    the run at the end of the epoch, on global counts."""
    from service.errors import DataError

    folder = _images(tmp_path / "imgs", n=16)
    for i in range(48):
        (folder / "a" / f"bad{i}.jpg").write_bytes(b"")
    cfg = load_config("quickstart", overrides=[*SMALL, f"data.path={folder}",
                                               f"storage.root={tmp_path}", "run_name=bad",
                                               "train.batch_size=16", "eval.knn_every_epochs=0"])
    loop = Loop(cfg, InProcessContext(str(tmp_path / "bad")), str(tmp_path / "bad"),
                NullTracker())
    with pytest.raises(DataError, match=r"48 of 64 images could not be read, more than "
                                        r"data.max_unreadable_fraction=0.5"):
        loop.run()


# ---------------------------------------------------------------------------- 4: before Ray


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_a_missing_or_empty_data_path_fails_before_ray(tmp_path, what, here):
    folder = tmp_path / "imgs"
    if what == "empty":
        folder.mkdir()
    rc, _, err = here("train", "--preset", "quickstart", *T, f"data.path={folder}",
                      f"storage.root={tmp_path / 'runs'}")
    one_line(rc, err, set(), 1, f"data.path={folder}")


def test_resume_of_nothing_or_of_a_file_fails_before_ray(tmp_path, here):
    (tmp_path / "notes.txt").write_text("hello")
    for target, words in ((tmp_path / "nothing", "no such checkpoint or run folder"),
                          (tmp_path / "notes.txt", "is a file, not a checkpoint")):
        rc, _, err = here("train", "--preset", "quickstart", *T, "--resume", str(target),
                          f"storage.root={tmp_path / 'runs'}", "run_name=fresh")
        one_line(rc, err, set(), 1, "train.resume", str(target), words)


def test_a_reused_run_name_with_another_model_fails_before_ray(quick_run, here):
    rc, _, err = here("train", "--preset", "quickstart", *T, "model.depth=2",
                      f"storage.root={quick_run}", "run_name=quick")
    one_line(rc, err, set(), 2, "run 'quick'", "model.depth: 1 there, 2 here", "run_name=")


@pytest.mark.budget(25)
def test_storage_without_credentials_fails_naming_the_url(tmp_path):
    env: dict[str, str | None] = {k: None for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                           "AWS_PROFILE")}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    rc, _, err, imported = dino("train", "--preset", "quickstart", *T,
                                "storage.root=s3://bucket/x", env=env)
    one_line(rc, err, imported, 1, "StorageError", "s3://bucket/x", "NoCredentialsError")


# ---------------------------------------------------------------------------- 5: eval knn


@pytest.mark.budget(25)
def test_knn_of_an_exported_file_uses_the_runs_data_and_image_size(quick_run, tmp_path, capsys):
    from service.cli import main

    run = str(quick_run / "quick")
    knn = ["eval", "knn", "--train", "procedural", "--val", "procedural", "--k", "5",
           "--num-workers", "0", "--json"]
    assert main([*knn, "--checkpoint", run]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out)
    assert from_checkpoint["image_size"] == 32  # the run's eval.image_size, not 224
    out = tmp_path / "b.safetensors"
    assert main(["export", "--checkpoint", run, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*knn, "--checkpoint", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == from_checkpoint  # same set, same numbers


def test_knn_matches_class_folders_by_name_and_refuses_disjoint_ones(quick_run, tmp_path,
                                                                      capsys):
    from service.cli import main

    train = _images(tmp_path / "train", n=3, classes=("ant", "bee", "cat"))
    val = tmp_path / "val"
    for c in ("bee", "cat"):  # sorted positions 0, 1 here but 1, 2 in train
        (val / c).mkdir(parents=True)
        for f in (train / c).iterdir():
            (val / c / f.name).write_bytes(f.read_bytes())
    for i, c in enumerate(("ant", "bee", "cat")):  # each class its own colour
        for f in (train / c).iterdir():
            Image.new("RGB", (16, 16), (0, 0, 120 * i)).save(f)
            if (val / c / f.name).exists():
                Image.new("RGB", (16, 16), (0, 0, 120 * i)).save(val / c / f.name)
    args = ["eval", "knn", "--checkpoint", str(quick_run / "quick"), "--train", str(train),
            "--k", "1", "--num-workers", "0", "--json"]
    assert main([*args, "--val", str(val)]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == 100.0  # by name; by position: 0
    other = _images(tmp_path / "other", n=2, classes=("dog",))
    assert main([*args, "--val", str(other)]) == 1
    assert "share no class" in capsys.readouterr().err


@pytest.mark.budget(30)
def test_knn_bad_arguments_are_one_line(quick_run, tmp_path, here, capsys):
    run = str(quick_run / "quick")
    base = ("eval", "knn", "--checkpoint", run, "--num-workers", "0")
    procedural = ("--train", "procedural", "--val", "procedural")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (16, 16)).save(flat / "x.png")
    with pytest.raises(SystemExit) as exited:  # argparse's own exit, in process
        here(*base, *procedural, "--k", "0")
    assert exited.value.code == 2 and "--k: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        here(*base, *procedural, "--image-size", "0")
    assert exited.value.code == 2
    assert "--image-size: must be at least 1" in capsys.readouterr().err
    rc, _, err = here(*base, *procedural, "--image-size", "4")
    one_line(rc, err, set(), 2, "--image-size 4 is smaller than one patch")  # ConfigError
    rc, _, err = here(*base, "--train", str(flat), "--val", "procedural")
    one_line(rc, err, set(), 1, "one sub-folder per class")


# ---------------------------------------------------------------------------- one line, not a traceback


@pytest.mark.budget(30)
def test_tracebacks_become_one_line(quick_run, tmp_path, here):
    run = str(quick_run / "quick")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  epochs: [1, 2\n")
    rc, _, err, imported = dino("train", "--config", str(bad_yaml))  # its own process
    one_line(rc, err, imported, 2, str(bad_yaml), "line", "not valid YAML")

    text = tmp_path / "photo.jpg"
    text.write_text("not an image")
    rc, _, err = here("attention", "--checkpoint", run, "--image", str(text), "--out",
                      str(tmp_path / "attn"))
    one_line(rc, err, set(), 1, str(text), "is not a readable image")
    rc, _, err = here("export", "--checkpoint", run, "--out",
                      str(tmp_path / "no" / "b.safetensors"))
    one_line(rc, err, set(), 1, str(tmp_path / "no"), "does not exist")
    rc, _, err = here("export", "--checkpoint", run, "--out", str(tmp_path))
    one_line(rc, err, set(), 1, "is a directory")
    rc, _, err = here("eval", "linear", "--checkpoint", run, "--train", "procedural", "--val",
                      "procedural", "--n-last-blocks", "9")
    one_line(rc, err, set(), 1, "--n-last-blocks 9: the backbone has 1 blocks")
    rc, _, err = here("data", "--out", str(text))
    one_line(rc, err, set(), 2, str(text), "is a file")


# ---------------------------------------------------------------------------- confusing


def test_overrides_and_v_go_anywhere_after_the_command(tmp_path):
    rc, out, err, _ = dino("config", "--preset", "quickstart", "optim.lr=1e-3",
                           "--config", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "missing.yaml: no such file" in err
    rc, out, _, _ = dino("config", "--preset", "quickstart", "-v", "optim.lr=0.002")
    assert rc == 0 and "lr: 0.002" in out
    from service.cli.common import parse
    from service.cli.main import build_parser

    args = parse(build_parser(), ["train", "--preset", "quickstart", "--resume", "X",
                                  "run_name=y", "-v"])
    assert args.resume == "X" and args.overrides == ["run_name=y"] and args.verbose


def test_dino_config_shows_that_train_names_each_run():
    rc, out, _, _ = dino("config", "optim.lr=1e-3")
    assert rc == 0 and out.startswith("run_name: dino-<UTC time>-<hex>  # a fresh name")


@pytest.mark.budget(20)
def test_dino_data_counts_images_and_says_its_settings(tmp_path):
    rc, out, _, _ = dino("data", "--out", str(tmp_path / "d"), "--n", "12", "--preset",
                         "quickstart")
    assert rc == 0, out
    assert out.startswith(f"wrote 12 images to {tmp_path / 'd'}, masks under")
    assert "32 px" not in out and "light shapes on dark grey" in out and "(preset quickstart)" in out
    assert len(list((tmp_path / "d").rglob("*.png"))) == 12


@pytest.mark.budget(25)
def test_reversed_search_bounds_are_refused_before_ray(tmp_path):
    rc, _, err, imported = dino("tune", "--preset", "quickstart",
                                "--param", "optim.lr=loguniform:1e-2,1e-4",
                                f"storage.root={tmp_path}")
    one_line(rc, err, imported, 2, "optim.lr", "low < high", "loguniform:0.0001,0.01")


def test_storage_retries_state_their_deadline(caplog):
    from service.storage import Retrier, StorageError

    def down() -> None:
        raise ConnectionError("refused")

    with caplog.at_level(logging.WARNING), pytest.raises(StorageError):
        Retrier("s3://b/x", seconds=0.3, base_delay=0.1).call(down, "upload of y")
    first = caplog.records[0].getMessage()
    assert "retrying for up to 0.3 s, until" in first and "storage.retry_seconds" in first


def test_console_lines_number_epochs_alike(tmp_path, capfd, one_torch_thread):
    cfg = load_config("quickstart", overrides=[*SMALL, f"storage.root={tmp_path}",
                                               "run_name=n", "train.epochs=2",
                                               "train.log_every_steps=2",
                                               "train.checkpoint_every_epochs=1",
                                               "eval.knn_every_epochs=0"])
    Loop(cfg, InProcessContext(str(tmp_path / "n")), str(tmp_path / "n"), NullTracker()).run()
    lines = capfd.readouterr().out.splitlines()
    assert "[dino] epoch 1/2 step 2/4" in lines[1] and "[dino] checkpoint saved at epoch 1 step 2" in lines
    assert any(ln.startswith("[dino] epoch 2/2 step 4/4") for ln in lines)
    assert "[dino] checkpoint saved at epoch 2 step 4" in lines
