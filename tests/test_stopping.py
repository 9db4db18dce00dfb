"""Stop notices in the real loop, in this process (``InProcessContext``): a stop request and
a SIGTERM each end the run with a checkpoint of the step in progress, and the resumed run
gives, step for step, the losses of a run that was never stopped."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from test_train_loop import TINY, LossRecorder

from service.config import load_config
from service.storage import checkpoints as ckpt
from service.train import stopping
from service.train.context import InProcessContext
from service.train.loop import Loop

REPO = Path(__file__).resolve().parents[1]


class NoticeAt(LossRecorder):
    """Gives a notice when the loop logs step ``at``: it takes effect before the next one."""

    def __init__(self, at: int, notice) -> None:
        super().__init__()
        self.at, self.notice = at, notice

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        if step == self.at and "loss" in metrics:
            self.notice()


@pytest.fixture
def no_sigterm() -> Iterator[None]:
    stopping.SIGTERM_SEEN.clear()
    yield
    stopping.SIGTERM_SEEN.clear()


def _loop(root: Path, name: str, tracker: LossRecorder) -> Loop:
    cfg = load_config(None, None, [*TINY, f"storage.root={root}", f"run_name={name}",
                                   "train.stop_check_every_steps=1"])
    return Loop(cfg, InProcessContext(str(root / name), cfg.train.keep_last), str(root / name),
                tracker)


def _resume(root: Path, name: str) -> dict[int, float]:
    tracker = LossRecorder()
    loop = _loop(root, name, tracker)
    loop.run()
    assert loop.state.finished
    return tracker.losses()


def test_a_stop_request_checkpoints_the_current_step_and_ends_the_run(
        tmp_path, one_torch_thread, no_sigterm, monkeypatch):
    """The request is written at step 3 and seen by rank 0's poller (every 0.05 s here,
    10 s by default) a step or two later: the run stops at the step in progress then."""
    monkeypatch.setattr(stopping, "STOP_POLL_S", 0.05)
    whole = LossRecorder()
    _loop(tmp_path, "whole", whole).run()
    run_url = str(tmp_path / "split")
    first = NoticeAt(3, lambda: (stopping.request_stop(run_url, "test"), time.sleep(0.3)))
    loop = _loop(tmp_path, "split", first)
    loop.run()
    stopped_at = loop.state.global_step
    assert loop.stopped and 3 <= stopped_at < 6 and loop.state.batch_in_epoch == stopped_at
    saved = ckpt.checkpoint_dirs(run_url)
    assert [ckpt.verify(d)["global_step"] for d in saved] == [stopped_at]
    assert not (tmp_path / "split" / "teacher_backbone.safetensors").exists()  # not finished
    assert stopping.clear_stop(run_url)  # as the next `dino train` does
    second = _resume(tmp_path, "split")
    assert min(second) == stopped_at + 1
    assert {**first.losses(), **second} == whole.losses()  # no step lost, none twice


def test_sigterm_checkpoints_the_current_step_then_leaves(tmp_path, one_torch_thread,
                                                          no_sigterm):
    whole = LossRecorder()
    _loop(tmp_path, "whole", whole).run()
    first = NoticeAt(8, stopping.SIGTERM_SEEN.set)  # the handler's whole work
    with pytest.raises(stopping.Preempted, match="SIGTERM to a training worker: left after "
                                                 "the checkpoint of step 8"):
        _loop(tmp_path, "term", first).run()
    saved = ckpt.checkpoint_dirs(str(tmp_path / "term"))
    assert ckpt.verify(saved[-1])["global_step"] == 8  # epoch 1 (6) and the notice's (8)
    stopping.SIGTERM_SEEN.clear()  # a new process
    second = _resume(tmp_path, "term")
    assert min(second) == 9
    assert {**first.losses(), **second} == whole.losses()


def test_the_world_size_is_logged_with_every_step(tmp_path, one_torch_thread, no_sigterm):
    tracker = LossRecorder()
    _loop(tmp_path, "ws", tracker).run()
    logged = [m["world_size"] for _, m in tracker.metrics if "loss" in m]
    assert logged and set(logged) == {1}


def test_an_elastic_range_on_packed_data_is_refused_before_ray(tmp_path):
    from dino_core.data.procedural import write_image_folder
    from service.config import ConfigError, resolve_paths
    from service.data.pack import pack
    from service.train.preflight import preflight

    write_image_folder(tmp_path / "imgs", 30, 24, 3, 0, masks=False)
    pack(str(tmp_path / "imgs"), str(tmp_path / "shards"), shard_bytes=8_000, parallel=False)
    cfg = resolve_paths(load_config(None, None, [
        *TINY, f"storage.root={tmp_path / 'runs'}", f"data.path={tmp_path / 'shards'}",
        "ray.num_workers=2-4", "train.batch_size=12"]))
    with pytest.raises(ConfigError, match="ray.num_workers=2-4 with the packed dataset"):
        preflight(cfg, str(tmp_path / "runs" / "x"))


_MAIN_THREAD_BUSY = """
import signal, threading, time
from service.train import stopping

stopping.install_sigterm_handler()
seen = {}

def training_thread():
    import os
    main_blocked.wait()
    os.kill(os.getpid(), signal.SIGTERM)
    until = time.monotonic() + 2
    while time.monotonic() < until and not stopping.sigterm_seen():
        time.sleep(0.01)
    seen["pipe"], seen["main_awake"] = stopping.sigterm_seen(), main_awake

main_awake, main_blocked = False, threading.Event()
thread = threading.Thread(target=training_thread)
thread.start()  # before the mask: a thread inherits its maker's
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # delivered to the thread, then
main_blocked.set()
time.sleep(3)  # the main thread in C the whole time, as Ray's task loop
main_awake = True
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
thread.join()
print(seen["pipe"], seen["main_awake"], stopping.SIGTERM_SEEN.is_set())
"""


def test_a_sigterm_is_seen_while_the_main_thread_runs_no_python():
    """The signal reaches the training thread's process while the main thread is in C code
    (a Ray worker's task loop): Python would run the handler only when the main thread runs
    Python again; the wakeup pipe shows it to the training thread at once (a CI run trained
    760 steps past a SIGTERM before this)."""
    out = subprocess.run([sys.executable, "-c", _MAIN_THREAD_BUSY], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "True"], out.stdout + out.stderr[-2000:]
