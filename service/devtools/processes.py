"""Child processes of the local stack, stopped by pid: each server is a ``Service`` with every
pid of its process tree (create times guard against pid reuse). Nothing here stops processes
by name: ``ray stop`` would kill every Ray cluster on the machine."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class Service:
    """A started server: how to reach it and every process that belongs to it."""

    name: str
    address: str  # s3: endpoint URL; mlflow: tracking URI; ray: GCS host:port
    log_file: str
    pids: dict[int, float]  # pid -> create time (guards against pid reuse); first = launched
    env: dict[str, str] = field(default_factory=dict)  # what a client exports to use it
    extra: dict[str, str] = field(default_factory=dict)  # e.g. ray: dashboard_url

    @property
    def endpoint_url(self) -> str:
        return self.address

    @property
    def tracking_uri(self) -> str:
        return self.address

    @property
    def dashboard_url(self) -> str:
        return self.extra["dashboard_url"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (another process may still take it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers 2xx; fail early if ``proc`` exits.

    Not any answer: on a port taken by another server, that server's 404 is no sign of ours.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):  # refused, reset, or an HTTPError (4xx/5xx)
            urllib.request.urlopen(url, timeout=2).close()
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) before {url}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


def _with_children(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = {p.pid: p for p in procs}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.update((c.pid, c) for c in p.children(recursive=True))
    return list(out.values())


def _tree(pid: int) -> dict[int, float]:
    out = {}
    with contextlib.suppress(psutil.Error):
        for p in _with_children([psutil.Process(pid)]):
            with contextlib.suppress(psutil.Error):
                out[p.pid] = p.create_time()
    return out


def _live(pids: dict[int, float]) -> list[psutil.Process]:
    """The recorded processes still running (same create time, not a zombie)."""
    live = []
    for pid, created in pids.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.5 and p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
    return live


def _listens(proc: psutil.Process, port: int | None) -> bool:
    with contextlib.suppress(psutil.Error):
        for c in proc.net_connections("inet"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                return True
    return False


def alive_pids(service: Service) -> list[int]:
    return [p.pid for p in _live(service.pids)]


def stop(*services: Service, grace: float = 10.0) -> None:
    """SIGTERM the services' processes and their current children, SIGKILL after ``grace``.

    Children are collected before anything is signalled: once a parent dies they are
    re-parented and cannot be found from it. Every pid signalled is added to ``pids``.
    """
    procs = []
    for service in services:
        for p in _with_children(_live(service.pids)):
            with contextlib.suppress(psutil.Error):
                service.pids.setdefault(p.pid, p.create_time())
                procs.append(p)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    for service in services:
        address_file = Path(service.extra.get("address_file", "/nonexistent"))
        if address_file.is_file() and address_file.read_text().strip() == service.address:
            address_file.unlink()  # else the next ray.init() tries to join a dead cluster


def _start(
    name: str, cmd: list[str], log_dir: str | Path, env: dict[str, str], ready: str, timeout: float
) -> tuple[dict[int, float], str]:
    """Run ``cmd`` logging to ``<log_dir>/<name>.log``; its process tree once ``ready`` answers."""
    log_file = Path(log_dir).absolute() / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        # Own session: Ctrl-C or closing the terminal that ran `dino stack up` leaves it be.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, start_new_session=True,
        )  # fmt: skip
    try:
        wait_http(ready, timeout, proc)
        pids, port = _tree(proc.pid), urllib.parse.urlsplit(ready).port
        if not any(_listens(p, port) for p in _live(pids)):
            raise RuntimeError(f"another process answers on port {port}")
        return pids, str(log_file)
    except BaseException as e:
        stop(Service(name, "", str(log_file), _tree(proc.pid)), grace=5)
        proc.wait()
        if not isinstance(e, Exception):
            raise
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{name} did not start: {e}\n{log_file} ends with:\n{tail}") from e
