"""A Ray cluster of several nodes on this machine: a head and worker nodes, each its own
raylet, for the tests and benchmarks of node loss, preemption and elastic training.

Every node is ``ray start --block`` in a session of its own (``setsid``), so a node is one
process group: killing the group takes the raylet and everything it started down together,
as a lost machine would (see ../shared/PLATFORM_NOTES.md). Nothing here calls ``ray stop``.
Worker nodes get ``--num-cpus`` (1 by default) and a custom resource ``node_<name>`` that
pins work to them; the head has no CPU, so training workers land on worker nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from service.devtools.processes import free_port

HOST = "127.0.0.1"
# a lost node is noticed within ~3 s instead of Ray's default ~30 s
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000",
                      "RAY_health_check_failure_threshold": "3",
                      "RAY_health_check_timeout_ms": "1000"}


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the leader's pid is the group's id


@dataclass
class LocalCluster:
    """``start()`` the head; ``add_node(name)``; ``kill_node(name)`` (SIGKILL to the node's
    process group), ``terminate_node(name)`` (SIGTERM to ``ray start``: a pod being deleted,
    which drains the node for preemption first); ``stop()`` everything, by process group."""

    temp_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    drain_timeout_s: float = 0
    # "fast" (FAST_HEALTH_CHECKS: a lost node noticed in ~3 s, what the tests use) or
    # "default" (Ray's own settings, as the Kubernetes manifests keep them: ~30 s)
    health_checks: str = "fast"
    port: int = 0
    dashboard_port: int = 0
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a driver process needs to join this cluster."""
        return {**self.env, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": self.address,
                "RAY_API_SERVER_ADDRESS": self.dashboard_url}

    def _env(self) -> dict[str, str]:
        fast = FAST_HEALTH_CHECKS if self.health_checks == "fast" else {}
        inherited = {k: v for k, v in os.environ.items() if k not in FAST_HEALTH_CHECKS}
        return {**inherited, **self.env, **fast, "RAY_AUTH_MODE": "disabled",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": f"{self.drain_timeout_s:g}"}

    def _spawn(self, name: str, args: list[str]) -> Node:
        log = self.temp_dir / f"node-{name}.log"
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
               "--disable-usage-stats", *args]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self._env(),
                                    start_new_session=True)
        node = self.nodes[name] = Node(name, proc, log)
        return node

    def start(self, timeout: float = 90, resources: dict[str, float] | None = None
              ) -> LocalCluster:
        """The head: no CPU; ``resources`` besides ``head: 1`` (e.g. Tune's
        ``trial_driver`` slots, so that trial drivers run there)."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.port, self.dashboard_port = free_port(HOST), free_port(HOST)
        head = json.dumps({"head": 1, **(resources or {})})
        self._spawn("head", [
            "--head", f"--port={self.port}", "--num-cpus=0", f"--resources={head}",
            f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port(HOST)}",
            f"--dashboard-agent-listen-port={free_port(HOST)}", f"--temp-dir={self.temp_dir}"])
        self.wait_nodes(1, timeout)
        return self

    def add_node(self, name: str, num_cpus: int = 1, wait: bool = True,
                 timeout: float = 90) -> Node:
        node = self._spawn(name, [
            f"--address={self.address}", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps({f'node_{name}': 1})}",
            f"--dashboard-agent-listen-port={free_port(HOST)}"])
        if wait:
            self.wait_until(lambda: self.node_id(name) is not None, timeout,
                            f"node {name} alive")
        return node

    def alive_nodes(self) -> list[dict]:
        """The nodes the head's state API lists as alive (empty while it is not up)."""
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/nodes?limit=100",
                                        timeout=5) as r:
                rows = json.load(r)["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []
        return [n for n in rows if n.get("state") == "ALIVE"]

    def wait_until(self, done, timeout: float, what: str) -> None:
        """Polls ``done()`` until it is true; an error naming ``what`` and the tails of the
        logs of nodes that exited, after ``timeout`` seconds."""
        deadline = time.time() + timeout
        while not done():
            dead = [n.name for n in self.nodes.values() if n.proc.poll() is not None]
            if dead or time.time() > deadline:
                tails = {n: self.nodes[n].log.read_text()[-2000:] for n in dead}
                raise RuntimeError(f"not {what} within {timeout} s (alive: "
                                   f"{len(self.alive_nodes())} nodes); exited: {tails}")
            time.sleep(0.5)

    def wait_gone(self, name: str, timeout: float = 60) -> None:
        """Until the head no longer lists node ``name`` as alive (after a kill)."""
        self.wait_until(lambda: self.node_id(name) is None, timeout, f"node {name} gone")

    def wait_nodes(self, count: int, timeout: float) -> None:
        self.wait_until(lambda: len(self.alive_nodes()) == count, timeout,
                        f"{count} alive nodes")

    def node_id(self, name: str) -> str | None:
        """The node id of worker node ``name`` (by its custom resource)."""
        for n in self.alive_nodes():
            if f"node_{name}" in (n.get("resources_total") or {}):
                return n["node_id"]
        return None

    def kill_node(self, name: str) -> None:
        """SIGKILL to the whole node (raylet, agents, workers): a lost machine."""
        node = self.nodes.pop(name)
        _signal_group(node.pgid, signal.SIGKILL)
        node.proc.wait(timeout=30)

    def terminate_node(self, name: str) -> Node:
        """SIGTERM to the node's ``ray start --block``, as Kubernetes does to a pod: Ray
        drains the node (reason preemption) for ``drain_timeout_s``, then stops it."""
        node = self.nodes[name]
        node.proc.send_signal(signal.SIGTERM)
        return node

    def stop(self, grace: float = 10) -> None:
        """TERM, then KILL, to each node's process group, worker nodes first."""
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            node = self.nodes.pop(name, None)
            if node is None:
                continue
            _signal_group(node.pgid, signal.SIGTERM)
            try:
                node.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(node.pgid, signal.SIGKILL)
            node.proc.wait(timeout=30)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
