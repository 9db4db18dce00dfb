"""Faults injected into real training runs: a NaN loss, a killed Ray Train worker. The Ray
runs are a real ``dino train`` on a local Ray instance of its own (the fact under test is
Ray's: its worker processes and FailureConfig); the loop's own NaN policies run in process.
A killed driver re-run with the same command is in test_shards_runs (killed mid-epoch)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_service_train import TINY

from dino_core import NonFiniteLossError
from service.config import load_config
from service.storage import checkpoints as ckpt
from service.tracking import NullTracker
from service.train.context import InProcessContext
from service.train.loop import Loop
from service.train.policies import FaultInjector

REPO = Path(__file__).resolve().parents[1]
QUIET = [*TINY, "tracking.enabled=false", "data.num_workers=0"]


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "train", *QUIET, *overrides]


def env_for(ray_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_dir), **extra}


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def final_state(run_dir: Path) -> dict:
    latest = ckpt.load_latest_valid([str(p) for p in checkpoints(run_dir)])
    assert latest is not None, f"no valid checkpoint in {run_dir}"
    return latest[1]


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for part in ("student", "teacher")
               for v in state[part].values() if v.is_floating_point())


# ---------------------------------------------------------------------------- NaN / inf


@pytest.mark.integration
@pytest.mark.budget(150)
def test_nan_loss_under_ray_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, ray_tmp
):
    """NaN crops at global step 11 (epoch 2 of 8-step epochs) in a Ray Train worker: the run
    stops naming step 11 in one ``dino:`` line, as in process (not Ray's 70-line report of
    the worker's traceback), every other line one of ours, and the epoch-1 checkpoint (step
    8) is the latest, complete and finite. (The deferred check and skip-and-count are the
    loop's own policy: in process, below.)"""
    out = subprocess.run(
        train_cmd(f"storage.root={tmp_path}", "run_name=nan", "train.epochs=3",
                  "drill.nonfinite_steps=[11]"),
        cwd=REPO, env=env_for(ray_tmp),
        capture_output=True, text=True, timeout=400)  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert out.stderr.strip().splitlines() == [
        "dino: NonFiniteLossError: non-finite DINO loss nan at global step 11; nothing was "
        "updated for this step (try a lower lr, a lower teacher temperature, or fp32)"], text[-3000:]
    assert all(ln.startswith("[dino] ") for ln in out.stdout.splitlines()), out.stdout[-3000:]
    assert "step 24/24" not in out.stdout
    cks = checkpoints(tmp_path / "nan")
    assert len(cks) == 1, cks
    ckpt.verify(str(cks[0]))
    state = final_state(tmp_path / "nan")
    assert (state["epoch"], state["global_step"]) == (1, 8)
    assert all_finite(state)


def _in_process(root: Path, name: str, nan_steps: set[int], *overrides: str) -> Loop:
    cfg = load_config(None, None, [*TINY, "tracking.enabled=false", f"storage.root={root}",
                                   f"run_name={name}", *overrides])
    run_url = str(root / name)
    loop = Loop(cfg, InProcessContext(run_url, cfg.train.keep_last), run_url, NullTracker(),
                faults=FaultInjector(nan_steps))
    loop.run()
    return loop


def test_deferred_nan_check_stops_at_the_bad_step_with_the_state_untouched(
    tmp_path, one_torch_thread
):
    """``train.defer_nonfinite_check=on`` (the GPU default: no host sync per step, the bad
    step a no-op on the device, the count read at log steps): the stop still names step 11
    and the epoch-1 checkpoint (step 8) stays the latest, finite."""
    with pytest.raises(NonFiniteLossError, match="global step 11"):
        _in_process(tmp_path, "nan", {11}, "train.epochs=3", "train.defer_nonfinite_check=on")
    cks = checkpoints(tmp_path / "nan")
    assert len(cks) == 1, cks
    state = final_state(tmp_path / "nan")
    assert (state["epoch"], state["global_step"]) == (1, 8)
    assert all_finite(state)


def test_isolated_nan_steps_are_skipped_and_counted(tmp_path, one_torch_thread, capfd):
    loop = _in_process(tmp_path, "skip", {3, 11}, "train.epochs=2", "train.on_nonfinite=skip",
                       "train.max_skipped_steps=3", "train.defer_nonfinite_check=on")
    out = capfd.readouterr().out
    assert "non-finite loss at step 3: step skipped (1 so far" in out
    assert "non-finite loss at step 11: step skipped (2 so far" in out
    assert loop.state.global_step == 16
    state = final_state(tmp_path / "skip")
    assert (state["global_step"], state["skipped_steps"]) == (16, 2)
    assert all_finite(state)


# ---------------------------------------------------------------------------- killed processes


def _read_until(proc: subprocess.Popen, pattern: str, lines: list[str], timeout: float) -> re.Match:
    """Reads the run's output line by line until ``pattern`` matches one."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"run ended before {pattern!r}:\n{''.join(lines[-40:])}")
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{''.join(lines[-40:])}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to a run's process group, then to every child by pid (Ray's own daemons may
    have left the group); waits for the run."""
    group = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in group:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.integration
@pytest.mark.budget(200)
def test_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(
    tmp_path, ray_tmp
):
    """SIGKILL to the Ray Train worker process after the first checkpoint (step 8) and two
    more steps: Ray's FailureConfig restarts the worker group, which restores the checkpoint
    and finishes; the step counter continues, steps 9 and 10 are trained again with the same
    losses (same state, same RNG), and every checkpoint in storage is complete."""
    proc = _start(train_cmd(f"storage.root={tmp_path}", "run_name=wk", "train.epochs=4",
                            "ray.max_failures=1"), env_for(ray_tmp))
    lines: list[str] = []
    try:
        pid = int(_read_until(proc, r"worker rank 0/1 pid (\d+)", lines, 240).group(1))
        _read_until(proc, r"checkpoint saved at epoch 1 step 8", lines, 240)
        _read_until(proc, r"step 10/32 ", lines, 240)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        m = _read_until(proc, r"resumed from (\S+) at epoch (\d+) step (\d+)", lines, 240)
        recovered_s = time.monotonic() - killed_at
        new_pid = int(_read_until(proc, r"worker rank 0/1 pid (\d+)", lines, 60).group(1))
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    assert new_pid != pid
    epoch, step = int(m.group(2)), int(m.group(3))
    assert step == 8 * epoch and step >= 8
    # the step counter continues from the restored step, and the restored run repeats
    # the killed worker's losses exactly (same state, same RNG). Ray's log forwarding
    # now and then drops the first lines a restarted worker prints (seen: 1-2 lines).
    cut = text.index("resumed from")
    progress = r"step (\d+)/32 loss (\S+)"
    before = {int(s): loss for s, loss in re.findall(progress, text[:cut])}
    after = [(int(s), loss) for s, loss in re.findall(progress, text[cut:])]
    assert after and step < after[0][0] <= step + 2, text[cut:cut + 2000]
    assert [s for s, _ in after] == list(range(after[0][0], 33))
    repeated = [(s, loss) for s, loss in after if s in before and s > step]
    # steps 9 and 10 (at least) were printed before the kill, and are trained again: one of
    # them at least is printed again (Ray's log forwarding may drop a restarted worker's
    # first line), so the comparison below is never over nothing
    assert repeated, (after[:5], before)
    assert all(before[s] == loss for s, loss in repeated), (repeated, before)
    for c in checkpoints(tmp_path / "wk"):
        ckpt.verify(str(c))
    assert final_state(tmp_path / "wk")["global_step"] == 32
    print(f"worker {pid} killed; restored at step {step} in {recovered_s:.1f} s")
