"""Notices that the group must stop soon, and the one answer to all of them: a checkpoint of
the current step, committed before the workers go, so that the run loses no step.

The notices, and what follows the checkpoint:

- ``SIGTERM`` to a training worker (a pod evicted, ``kill``): the ranks leave with
  ``Preempted``; Ray restarts the group (``ray.max_failures``) from that checkpoint.
- Ray drains a worker's node for preemption (``ray drain-node``, or a ``ray start --block``
  that got SIGTERM, as a Kubernetes pod does): ``ray.train.get_preemption_info()`` says so;
  the ranks hold still until Ray replaces the group after the drain deadline.
- Ray resizes an elastic group (``service.train.resize`` asks before it does): hold, too.
- A stop request (``dino jobs stop``, or SIGTERM/Ctrl-C to the driver): the run's
  ``control/stop`` marker in storage; the ranks end the run, which resumes on the next
  ``dino train`` of the same name.

Every rank reaches the same decision at the same step (one all-reduce of the flags, the
same one that checks for unreadable batches), which is what lets them checkpoint together.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from enum import IntEnum

from service import storage
from service.train.ray_compat import kv_get, kv_put

log = logging.getLogger(__name__)

SIGTERM_SEEN = threading.Event()
STOP_POLL_S = 10.0  # how often rank 0 looks for a stop request in storage
STOP_MARKER = "control/stop"
RESIZE_KEY = "dino:{run}:save-request"  # Ray internal KV: the resize hook's request id
SAVED_KEY = "dino:{run}:saved"  # the request id rank 0 answers with, once it has saved


class Preempted(RuntimeError):
    """Raised by every rank after the checkpoint that a SIGTERM to a worker asked for."""


class Notice(IntEnum):
    """What the ranks agreed on at a step, the largest wins."""

    NONE = 0
    STOP = 1  # a stop request: checkpoint and end the run
    HOLD = 2  # a drain or a resize: checkpoint and wait for Ray to replace the group
    LEAVE = 3  # SIGTERM to a worker: checkpoint and leave


_wakeup_fd: int | None = None  # the read end of the pipe the interpreter writes signals to


def install_sigterm_handler() -> None:
    """Runs on a training worker's main thread (the only one that may set handlers; the
    training function runs in another): a SIGTERM is noted, the loop checkpoints at its
    next step and leaves, instead of Ray's handler ending the process at once.

    Python runs a handler only when the main thread next runs Python code, and a Ray
    worker's main thread may sit in Ray's C++ task loop for as long as the run lasts (a CI
    run trained 760 steps past a SIGTERM that was never handled). So the signal is also read
    where it lands at once: ``signal.set_wakeup_fd``'s pipe, written by the interpreter's C
    handler on arrival, which the training thread reads (``sigterm_seen``)."""
    global _wakeup_fd
    signal.signal(signal.SIGTERM, lambda signum, frame: SIGTERM_SEEN.set())
    if _wakeup_fd is not None:
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:  # another's pipe (an event loop's): it stays, the handler alone tells
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return
    _wakeup_fd = read


def sigterm_seen() -> bool:
    """True once this process got a SIGTERM: its handler ran, or the wakeup pipe holds it."""
    if not SIGTERM_SEEN.is_set() and _wakeup_fd is not None:
        try:
            arrived = os.read(_wakeup_fd, 4096)  # one byte per signal, its number
        except BlockingIOError:
            arrived = b""
        if signal.SIGTERM in arrived:
            SIGTERM_SEEN.set()
    return SIGTERM_SEEN.is_set()


def stop_marker(run_url: str) -> str:
    return storage.join(run_url, STOP_MARKER)


def request_stop(run_url: str, why: str) -> None:
    """Asks the run's workers to checkpoint and end the run (they look every
    ``train.stop_check_every_steps`` steps)."""
    fs, path = storage.get_fs(stop_marker(run_url))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, why.encode())


def stop_requested(run_url: str) -> bool:
    fs, path = storage.get_fs(stop_marker(run_url))
    fs.invalidate_cache(path)  # s3fs caches listings: a marker written since would be missed
    return fs.exists(path)


def clear_stop(run_url: str) -> bool:
    """Removes a stop request left by an earlier stop; True if there was one."""
    fs, path = storage.get_fs(stop_marker(run_url))
    try:
        if fs.exists(path):
            fs.rm(path)
            return True
    except FileNotFoundError:
        pass
    return False


class MarkerPoller(threading.Thread):
    """Looks for the run's stop marker every ``every_s`` seconds, off the training thread: a
    storage call can take seconds (or fail, during an outage, which is not a stop request),
    and the step must not wait for it."""

    def __init__(self, run_url: str, every_s: float) -> None:
        super().__init__(name="dino-stop-marker", daemon=True)
        self.run_url, self.every_s = run_url, every_s
        self.seen = threading.Event()
        self.failures = 0

    def run(self) -> None:
        while not self.seen.is_set():
            try:
                if stop_requested(self.run_url):
                    self.seen.set()
                    return
            except Exception as err:  # storage away: no request seen; the next look retries
                self.failures += 1
                if self.failures == 1:
                    log.warning("[dino] could not look for a stop request at %s: %s",
                                stop_marker(self.run_url), err)
            time.sleep(self.every_s)


class StopWatch:
    """One rank's view of the notices; ``local(step)`` is this rank's, every step (the loop
    reduces it over the ranks). Drain notices and requests are looked for every ``every``
    steps, on every rank at the same steps (Ray's preemption query is a barrier)."""

    def __init__(self, ctx, run_url: str, run_name: str, every: int) -> None:
        self.ctx, self.run_url, self.every = ctx, run_url, every
        self.resize_key = RESIZE_KEY.format(run=run_name)
        self.saved_key = SAVED_KEY.format(run=run_name)
        self.request: bytes | None = None  # the resize request being answered
        self.reason = ""
        self.deadline_s: float | None = None
        self.poller: MarkerPoller | None = None  # rank 0's look at the stop marker

    def local(self, step: int) -> Notice:
        notice = Notice.NONE
        if sigterm_seen():
            self.reason, notice = "SIGTERM to a training worker", Notice.LEAVE
        if step % self.every:
            return notice
        info = self.ctx.preemption_notice()
        if info is not None and notice < Notice.HOLD:
            self.reason, notice = f"Ray drains a node for preemption ({info})", Notice.HOLD
            deadline_ms = getattr(info, "deadline_ms", None)  # epoch milliseconds
            self.deadline_s = max(0.0, deadline_ms / 1000 - time.time()) if deadline_ms else None
        if self.ctx.rank != 0:
            return notice
        if notice < Notice.HOLD:
            request = kv_get(self.resize_key)
            if request and request != kv_get(self.saved_key):
                self.request, self.reason = request, "Ray resizes the worker group"
                notice = Notice.HOLD
        if self.poller is None:
            self.poller = MarkerPoller(self.run_url, STOP_POLL_S)
            self.poller.start()
        if notice < Notice.STOP and self.poller.seen.is_set():
            self.reason, notice = "stop requested", Notice.STOP
        return notice

    def agreed(self, notice: Notice) -> Notice:
        """The notice all ranks agreed on; a rank that did not see it itself names it."""
        if not self.reason:
            self.reason = {Notice.LEAVE: "SIGTERM to a training worker",
                           Notice.HOLD: "Ray drains a node or resizes the group",
                           Notice.STOP: "stop requested"}.get(notice, "")
        return notice

    def saved(self) -> None:
        """Rank 0 answers the resize hook once the checkpoint is committed."""
        if self.ctx.rank == 0 and self.request is not None:
            kv_put(self.saved_key, self.request)

    def hold(self, grace_s: float) -> None:
        """Waits for Ray to replace the group (it ends this process); after ``grace_s``
        more than any deadline, leaves as preempted instead of training on."""
        until = time.time() + grace_s
        while time.time() < until:
            time.sleep(0.2)
        raise Preempted(f"{self.reason}: checkpoint saved, but the group was not replaced "
                        f"within {grace_s:g} s; leaving")
