"""What ``dino train`` checks before any cluster resource is taken (issue 27): the storage
root's bucket, that the root is a writable folder, and what a Ctrl-C before the first
checkpoint says. In process, through the command line's entry point or the preflight; Ray is
never started (the driver's ``init_ray`` fails the test if reached)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from service import storage
from service.cli.main import main
from service.config import load_config
from service.errors import StorageError
from service.train import driver
from service.train.preflight import check_storage, preflight


@pytest.fixture
def dino(capsys, monkeypatch):
    """``dino ARGS`` in this process: ``(rc, the lines on stderr)``; reaching Ray fails."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "init_ray", refuse)

    def run(*args: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        rc = main(list(args))
        return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]

    return run


def train_args(root: str | Path, tmp_path: Path, *more: str) -> list[str]:
    # a data path that does not exist: should the storage check let a bad root through, the
    # data check stops the run before Ray all the same (and names data.path, not the root)
    return ["train", "--preset", "quickstart", f"storage.root={root}", "run_name=r",
            f"data.path={tmp_path / 'no-images'}", *more]


# ---------------------------------------------------------------------- the storage root


def test_a_storage_root_that_is_a_file_is_one_line_naming_it(dino, tmp_path):
    """It ended in a 20-35-line traceback (the run lock's mkdir)."""
    f = tmp_path / "runs.txt"
    f.write_text("not a folder")
    for root, blamed in ((f, f), (f / "sub", f)):
        rc, err = dino(*train_args(root, tmp_path))
        assert rc == 1 and len(err) == 1, err
        assert err[0].startswith("dino: StorageError: storage.root=") and \
            f"{blamed} is a file" in err[0] and str(root) in err[0], err
    assert f.read_text() == "not a folder"


def test_a_storage_root_that_cannot_be_written_is_one_line_naming_it(dino, tmp_path):
    """/sys refuses new files and folders even to root (a chmod 555 folder would not, to
    root); a read-only mount answers the same way (EROFS)."""
    for root in ("/sys", "/sys/dino-runs"):
        rc, err = dino(*train_args(root, tmp_path))
        assert rc == 1 and len(err) == 1, err
        assert err[0].startswith(f"dino: StorageError: storage.root={root} ") and \
            "not writable" in err[0], err
    assert not Path("/sys/dino-runs").exists()


def test_a_writable_root_passes_and_keeps_no_probe(dino, tmp_path):
    root = tmp_path / "runs"
    rc, err = dino(*train_args(root, tmp_path))
    assert rc == 1 and len(err) == 1 and "data.path=" in err[0], err  # past the storage check
    assert [p.name for p in root.rglob("*") if "probe" in p.name] == []


# ------------------------------------------------------------------------------ Ctrl-C


def _interrupt(monkeypatch, tmp_path, save: bool) -> None:
    """The driver's ``train`` raises KeyboardInterrupt as a Ctrl-C in ``fit()`` makes it,
    after a first checkpoint or before any."""

    def train(cfg):
        if save:
            ckpt = tmp_path / "runs" / "r" / "checkpoint_000001"
            ckpt.mkdir(parents=True)
            (ckpt / "manifest.json").write_text("{}")  # what makes it a committed checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "train", train)
    monkeypatch.setattr("service.cli.train.flush_ray_logs", lambda: None)  # no Ray here


def test_ctrl_c_before_the_first_checkpoint_gives_no_resume_advice(dino, tmp_path, monkeypatch):
    """It said "its checkpoints are in ...; Resume it": there were none, and the rerun
    started at step 0."""
    _interrupt(monkeypatch, tmp_path, save=False)
    rc, err = dino("train", "--preset", "quickstart", f"storage.root={tmp_path / 'runs'}",
                   "run_name=r")
    assert rc == 130, err
    assert err[-1].startswith("dino: interrupted: run 'r' stopped before its first checkpoint")
    assert "nothing was saved" in err[-1] and "from the beginning" in err[-1], err
    assert "Resume" not in err[-1] and "checkpoints are in" not in err[-1], err


def test_ctrl_c_after_a_checkpoint_says_where_and_how_to_resume(dino, tmp_path, monkeypatch):
    _interrupt(monkeypatch, tmp_path, save=True)
    rc, err = dino("train", "--preset", "quickstart", f"storage.root={tmp_path / 'runs'}",
                   "run_name=r")
    assert rc == 130, err
    assert err[-1].startswith(f"dino: interrupted: run 'r' stopped; its checkpoints are in "
                              f"{tmp_path / 'runs' / 'r'}. Resume it with the same command"), err


# ---------------------------------------------------------------------------- the bucket


def _s3_config(s3_server, bucket: str, *more: str):
    return load_config("quickstart", None, [f"storage.root=s3://{bucket}/runs", "run_name=r",
                                            "storage.retry_seconds=5", *more])


@pytest.mark.integration  # moto's S3 server
@pytest.mark.budget(20)  # the session's S3 server starts in ~2 s, when this test is first
def test_a_missing_bucket_is_refused_before_ray_and_not_created(s3_server):
    """``storage.root=s3://nobucket/runs`` made the bucket and trained into it."""
    name = f"nobucket-{secrets.token_hex(4)}"  # a fresh name, never created
    cfg = _s3_config(s3_server, name)
    with pytest.raises(StorageError) as e:
        preflight(cfg, f"s3://{name}/runs/r")
    assert cfg.storage.create_bucket is False  # the default
    msg = str(e.value)
    assert f"storage.root=s3://{name}/runs" in msg and f"bucket {name!r} does not exist" in msg
    assert "storage.create_bucket=true" in msg and "\n" not in msg, msg
    fs, _ = storage.get_fs(f"s3://{name}")
    assert not fs.exists(name)


@pytest.mark.integration  # moto's S3 server
@pytest.mark.budget(20)
def test_create_bucket_makes_it_and_the_probe_leaves_nothing(s3_server):
    name = f"newbucket-{secrets.token_hex(4)}"
    root = f"s3://{name}/runs"
    assert _s3_config(s3_server, name, "storage.create_bucket=true").storage.create_bucket
    check_storage(root, create_bucket=True)
    fs, _ = storage.get_fs(root)
    assert fs.exists(name) and fs.ls(name) == []  # made; the write probe was deleted
    check_storage(root)  # it exists now: no flag needed
