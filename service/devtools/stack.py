"""Local servers as child processes, stopped by pid: S3 (moto), an MLflow server, a Ray head.

Used by the tests' fixtures and by ``dino stack up|down`` on a machine without Kubernetes.
``up`` records what it started in ``<state_dir>/stack.json`` so that ``down``, from another
process, stops exactly those processes. Nothing here stops processes by name: ``ray stop``
would kill every Ray cluster on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from dataclasses import asdict
from pathlib import Path

from service.devtools import require
from service.devtools.processes import (  # noqa: F401 - the tests' fixtures use them here
    Service,
    _start,
    alive_pids,
    free_port,
    stop,
    wait_http,
)

# moto accepts any credentials; botocore-based clients also need a region.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
S3_CREDENTIALS["AWS_DEFAULT_REGION"] = "us-east-1"
STATE_FILE = "stack.json"


def start_s3(log_dir: str | Path, port: int | None = None, host: str = "127.0.0.1") -> Service:
    """moto's S3-compatible server; ready in about a second."""
    require("the local S3 server", "stack", "moto")
    url = f"http://{host}:{port or free_port(host)}"
    cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", url.rsplit(":", 1)[1]]
    pids, log = _start("s3", cmd, log_dir, {}, url, timeout=30)
    return Service("s3", url, log, pids, {"AWS_ENDPOINT_URL": url, **S3_CREDENTIALS})


def create_bucket(s3: Service, name: str | None = None, prefix: str = "bucket") -> str:
    """Create a bucket (a fresh unique name unless ``name`` is given) and return its name."""
    import s3fs

    name = name or f"{prefix}-{secrets.token_hex(4)}"
    # No region_name: s3fs would send it as a LocationConstraint, invalid for us-east-1.
    key, secret = s3.env["AWS_ACCESS_KEY_ID"], s3.env["AWS_SECRET_ACCESS_KEY"]
    s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=s3.endpoint_url).mkdir(name)
    return name


def start_mlflow(
    log_dir: str | Path,
    backend_store_uri: str,
    artifacts_destination: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    s3: Service | None = None,
    job_execution: bool = False,
) -> Service:
    """``mlflow server`` with proxied artifacts; ``/health`` answers after 6-15 s.

    Args:
        backend_store_uri: e.g. ``sqlite:////abs/path/mlflow.db``.
        artifacts_destination: ``s3://bucket/`` (needs ``s3``) or an absolute local path.
        s3: where the artifacts go; clients then reach them through the server, without
            S3 credentials.
        job_execution: MLflow's job runner, 8 more processes and ~1.2 GiB; training uses none.
    """
    url = f"http://{host}:{port or free_port(host)}"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", host, "--port", url.rsplit(":", 1)[1],
        "--workers", "1", "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination,
    ]  # fmt: skip
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(job_execution).lower()}
    if s3 is not None:
        env |= {**s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url}
    pids, log = _start("mlflow", cmd, log_dir, env, f"{url}/health", timeout=120)
    extra = {"artifacts_destination": artifacts_destination}
    return Service("mlflow", url, log, pids, {"MLFLOW_TRACKING_URI": url}, extra)


def start_ray_head(
    log_dir: str | Path,
    port: int | None = None,
    dashboard_port: int | None = None,
    num_cpus: int = 2,
    temp_dir: str | None = None,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
) -> Service:
    """``ray start --head --block`` with token authentication; ready in 4-13 s.

    ``--block`` keeps ``ray start`` alive as the parent of every Ray process (GCS, raylet,
    dashboard, workers), so the tree under one pid is the whole cluster, and the kernel kills
    them if it dies. A fresh token goes to ``<log_dir>/ray_auth_token``; clients need
    ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (in ``Service.env``) set before
    ``import ray``, or the header from ``auth_headers``. Workers and jobs inherit ``env``.
    """
    port, dashboard_port = port or free_port(host), dashboard_port or free_port(host)
    token_file = Path(log_dir, "ray_auth_token").absolute()
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.touch(mode=0o600)
    token_file.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--port={port}", f"--dashboard-host={host}", f"--dashboard-port={dashboard_port}",
        f"--num-cpus={num_cpus}", "--disable-usage-stats",
        # Defaults (10001, 52365) would clash with a second cluster on this machine.
        f"--ray-client-server-port={free_port(host)}",
        f"--dashboard-agent-listen-port={free_port(host)}",
    ]  # fmt: skip
    cmd += [f"--temp-dir={temp_dir}"] if temp_dir else []
    dashboard = f"http://{host}:{dashboard_port}"
    # No drain on SIGTERM: a local cluster has no traffic to move (the default waits 30 s).
    run_env = {**(env or {}), **auth, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    pids, log = _start("ray", cmd, log_dir, run_env, f"{dashboard}/api/gcs_healthz", timeout=90)
    # The GCS gets the machine's IP, not 127.0.0.1 (Ray rewrites a loopback
    # --node-ip-address); ray start writes it to ray_current_cluster, at times after the
    # dashboard answers.
    linux_tmp = sys.platform.startswith("linux") and os.environ.get("TMPDIR")
    ray_tmp = temp_dir or Path(os.environ.get("RAY_TMPDIR") or linux_tmp or "/tmp", "ray")
    address_file, address = Path(ray_tmp, "ray_current_cluster"), f"{host}:{port}"
    for _ in range(100):
        if address_file.is_file() and address_file.read_text().endswith(f":{port}"):
            address = address_file.read_text().strip()
            break
        time.sleep(0.1)
    # RAY_ADDRESS for ray.init(); JobSubmissionClient and `ray job` read
    # RAY_API_SERVER_ADDRESS first (an http:// RAY_ADDRESS would break ray.init()).
    client = {"RAY_ADDRESS": address, "RAY_API_SERVER_ADDRESS": dashboard, **auth}
    extra = {"dashboard_url": dashboard, "address_file": str(address_file)}
    return Service("ray", address, log, pids, client, extra)


def auth_headers(ray: Service) -> dict[str, str]:
    """Headers for the dashboard and job API, e.g. ``JobSubmissionClient(url, headers=)``.

    For a process that imported ``ray`` before ``RAY_AUTH_MODE=token`` was set: Ray reads the
    mode once, so setting the variable later has no effect there.
    """
    return {"Authorization": f"Bearer {Path(ray.env['RAY_AUTH_TOKEN_PATH']).read_text()}"}


def load(state_dir: str | Path) -> list[Service]:
    path = Path(state_dir, STATE_FILE)
    services = json.loads(path.read_text())["services"] if path.is_file() else []
    for s in services:
        s["pids"] = {int(pid): created for pid, created in s["pids"].items()}
    return [Service(**s) for s in services]


def save(state_dir: str | Path, services: list[Service]) -> None:
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    data = {"services": [asdict(s) for s in services]}
    Path(state_dir, STATE_FILE).write_text(json.dumps(data, indent=2))


def client_env(services: list[Service], storage: str = "s3://dino/runs") -> dict[str, str]:
    """The environment a client exports to use ``services``."""
    env = {k: v for s in services for k, v in s.env.items()}
    if any(s.name == "s3" for s in services):
        env["DINO_STORAGE"] = storage
    return env


def up(
    state_dir: str | Path, with_ray: bool = True, with_s3: bool = True, with_mlflow: bool = True
) -> dict[str, str]:
    """Start the local stack; return the addresses by service name (plus ``ray_dashboard``).

    S3 gets the buckets ``dino`` (runs) and ``mlflow-artifacts``; Ray's workers and jobs
    inherit the S3 and MLflow settings.
    """
    state_dir = Path(state_dir).absolute()
    if any(alive_pids(s) for s in load(state_dir)):
        raise RuntimeError(f"a stack recorded in {state_dir} is running; run `down` first")
    logs, services = state_dir / "logs", []
    try:
        s3 = start_s3(logs) if with_s3 else None
        if s3:
            services.append(s3)
            save(state_dir, services)
            for bucket in ("dino", "mlflow-artifacts"):
                create_bucket(s3, bucket)
        if with_mlflow:
            artifacts = "s3://mlflow-artifacts/" if s3 else str(state_dir / "mlartifacts")
            db = f"sqlite:///{state_dir / 'mlflow.db'}"
            services.append(start_mlflow(logs, db, artifacts, s3=s3))
            save(state_dir, services)
        if with_ray:
            services.append(start_ray_head(logs, env=client_env(services)))
            save(state_dir, services)
    except BaseException:
        stop(*services)
        Path(state_dir, STATE_FILE).unlink(missing_ok=True)
        raise
    addresses = {s.name: s.address for s in services}
    if with_ray:
        addresses["ray_dashboard"] = services[-1].dashboard_url
    return addresses


def down(state_dir: str | Path) -> list[str]:
    """Stop everything ``up`` recorded in ``state_dir``; return the names stopped."""
    services = load(state_dir)
    stop(*services)
    Path(state_dir, STATE_FILE).unlink(missing_ok=True)
    return [s.name for s in services]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.devtools.stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "env"])
    parser.add_argument("--state-dir", default=".dino-stack")
    for name in ("ray", "s3", "mlflow"):
        parser.add_argument(f"--no-{name}", action="store_true", help=f"do not start {name}")
    args = parser.parse_args(argv)
    # Comments and exports only, so that `eval "$(python -m service.devtools.stack up)"` works.
    if args.command == "down":
        print("# stopped:", ", ".join(down(args.state_dir)) or "nothing")
        return 0
    if args.command == "up":
        if not args.no_s3:
            require("`dino stack up`", "stack", "moto")
        addresses = up(args.state_dir, not args.no_ray, not args.no_s3, not args.no_mlflow)
        print("\n".join(f"# {name}: {address}" for name, address in addresses.items()))
    for key, value in client_env(load(args.state_dir)).items():
        print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
