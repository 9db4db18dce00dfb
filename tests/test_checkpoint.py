"""Checkpoint integrity: committed by a manifest written last, verified on load, and a
damaged latest checkpoint falls back to the previous one with a warning."""

import logging

import pytest
import torch

from service.storage.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_latest_valid,
    verify,
    write_checkpoint,
)


def _write(path, step):
    state = {"epoch": step // 10, "global_step": step, "w": torch.full((1000,), float(step))}
    return write_checkpoint(path, state, f"run_name: r\n# step {step}\n")


def test_round_trip_and_manifest(tmp_path):
    d = _write(tmp_path / "c1", 10)
    manifest = verify(d)
    assert manifest["global_step"] == 10 and set(manifest["files"]) == {"state.pt", "config.yaml"}
    assert torch.equal(load_checkpoint(str(d))["w"], torch.full((1000,), 10.0))


def test_truncated_state_is_rejected(tmp_path):
    d = _write(tmp_path / "c1", 10)
    data = (d / "state.pt").read_bytes()
    (d / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"state.pt has \d+ bytes, the manifest says \d+"):
        load_checkpoint(str(d))


def test_same_size_corruption_is_rejected(tmp_path):
    d = _write(tmp_path / "c1", 10)
    data = bytearray((d / "state.pt").read_bytes())
    data[-100] ^= 0xFF
    (d / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        verify(d)


def test_uncommitted_checkpoint_is_never_loaded(tmp_path):
    d = _write(tmp_path / "c1", 10)
    (d / "manifest.json").unlink()  # as if the writer died before the commit
    with pytest.raises(CheckpointError, match="never completed"):
        load_checkpoint(str(d))


def test_damaged_latest_falls_back_to_previous(tmp_path, caplog):
    older, latest = _write(tmp_path / "c1", 10), _write(tmp_path / "c2", 20)
    data = (latest / "state.pt").read_bytes()
    (latest / "state.pt").write_bytes(data[:100])
    with caplog.at_level(logging.WARNING):
        uri, state = load_latest_valid([str(older), str(latest)])
    assert uri == str(older) and state["global_step"] == 10
    assert any("skipping damaged checkpoint" in r.message and "c2" in r.message
               for r in caplog.records)


def test_nothing_valid_returns_none(tmp_path):
    d = _write(tmp_path / "c1", 10)
    (d / "manifest.json").unlink()
    assert load_latest_valid([str(d)]) is None
