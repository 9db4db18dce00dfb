"""Ray Job Submission, client side: run ``dino train|tune`` as a job on a running cluster.

The job's driver is ``python -m service.cli <args>`` in an uploaded copy of this project
(``working_dir``) or ``dino <args>`` where the cluster image already has the package
installed. ``ray.address=auto`` is always added to the training arguments, so the driver
joins the cluster it runs on instead of starting a Ray of its own.

Environment: the job gets the local storage and MLflow settings (``DINO_*``, ``MLFLOW_*``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``...) as ``runtime_env.env_vars``. Secrets
(``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``MLFLOW_TRACKING_TOKEN``/``PASSWORD``, Ray
tokens, anything named like a secret, URLs with ``user:password@``) are never sent: the
runtime env, metadata and entrypoint of a job can be read by anyone who can read the
dashboard. Cluster nodes must get credentials from their own environment (a KubeRay pod
``envFrom`` a Kubernetes Secret, an instance role / IRSA / workload identity). The opt-in
``pass_secrets`` sends ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (the key id only
with its secret), for throwaway test clusters.

Auth: with ``RAY_AUTH_MODE=token`` Ray 2.60's ``JobSubmissionClient`` adds
``Authorization: Bearer`` itself (token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``), but only if the variable was set before ``ray`` was imported and
never when it is unset. ``auth_headers`` reads the same sources and passes the header
explicitly unless ``RAY_AUTH_MODE=disabled``; Ray keeps a header the caller gave.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from service.cluster.env import URL_WITH_PASSWORD, job_env

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Paths relative to the working dir (gitignore syntax); Ray also honours .gitignore/.rayignore.
EXCLUDES = [
    "/.git", "/runs", "/mlruns", "/.dino-stack", "/tests", "/build", "/dist", "/.venv",
    "*.egg-info", "__pycache__", "*.pyc", "mlflow.db", ".pytest_cache", ".ruff_cache",
    ".mypy_cache",
]  # fmt: skip
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


STOP_WAIT_S = "120"  # covers train.preemption_grace_s (30) with room for Ray's own shutdown


def resolve_address(address: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """``address``, else ``RAY_API_SERVER_ADDRESS``, else an http(s) ``RAY_ADDRESS``, else
    the local dashboard. (A plain ``RAY_ADDRESS`` is a GCS ``host:port``, not the job API.)"""
    ray_address = env.get("RAY_ADDRESS", "")
    for url in (
        address,
        env.get("RAY_API_SERVER_ADDRESS"),
        ray_address if ray_address.startswith(("http://", "https://")) else None,
    ):
        if url:
            return (url if "://" in url else f"http://{url}").rstrip("/")
    return DEFAULT_ADDRESS


def auth_headers(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``Authorization: Bearer <token>`` from the sources Ray reads, unless auth is disabled."""
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = env.get("RAY_AUTH_TOKEN", "")
    for path in (env.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if not token and path and Path(path).is_file():
            token = Path(path).read_text()
    return {"Authorization": f"Bearer {token.strip()}"} if token.strip() else {}


def client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(resolve_address(address), headers=auth_headers())


def submit(
    address: str | None,
    command_args: list[str],
    working_dir: str | None = None,
    use_installed_package: bool = False,
    env: Mapping[str, str] | None = None,
    job_id: str | None = None,
    entrypoint_num_cpus: float = 0,
    pass_secrets: bool = False,
) -> str:
    """Submit ``dino <command_args>`` (``train ...``, ``tune ...`` or ``embed ...``, already
    checked and pointed at the job's cluster by the CLI); return the job id.

    Args:
        working_dir: directory uploaded as the job's working dir (default: this project's
            root); ignored with ``use_installed_package``.
        use_installed_package: run the ``dino`` of the cluster image; nothing is uploaded.
        env: where to take the job's variables from (default: ``os.environ``).
        entrypoint_num_cpus: CPUs reserved for the driver; 0 because it only waits on the
            workers, and a reserved CPU would be one fewer for them.
        pass_secrets: also send the AWS key pair (visible in the job's info).
    """
    if not command_args or command_args[0] not in ("train", "tune", "embed"):
        raise ValueError("submit runs `train ...`, `tune ...` or `embed ...`")
    env = os.environ if env is None else env
    args = list(command_args)
    runtime_env: dict[str, Any] = {"env_vars": job_env(env, pass_secrets)}
    # `dino jobs stop` is SIGTERM to the driver, which asks the workers for a checkpoint of
    # the step in progress; Ray's job supervisor SIGKILLs after this wait (its default is 3 s)
    runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] = env.get("RAY_JOB_STOP_WAIT_TIME_S",
                                                                  STOP_WAIT_S)
    if use_installed_package:
        entrypoint = shlex.join(["dino", *args])
    else:
        runtime_env |= {
            "working_dir": str(Path(working_dir or PROJECT_ROOT).resolve()),
            "excludes": EXCLUDES,
        }
        entrypoint = shlex.join(["python", "-m", "service.cli", *args])
    if not pass_secrets and any(URL_WITH_PASSWORD.search(a) for a in args):
        raise ValueError("an argument embeds user:password@; it would be visible in the job info")
    if pass_secrets:
        log.warning(
            "SECRETS SENT (--pass-secrets): the AWS key pair is stored in the job's runtime_env, "
            "readable by anyone with dashboard access to %s",
            resolve_address(address),
        )
    return client(address).submit_job(
        entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
        metadata={"dino.command": args[0]}, entrypoint_num_cpus=entrypoint_num_cpus,
    )  # fmt: skip


def list_jobs(address: str | None = None) -> list:
    """Every job of the cluster, oldest first."""
    return sorted(client(address).list_jobs(), key=lambda j: j.start_time or 0)


def status(job_id: str, address: str | None = None):
    """The job's ``JobDetails``: ``.status``, ``.message``, ``.entrypoint``, times..."""
    return client(address).get_job_info(job_id)


def wait_for(
    job_id: str, address: str | None = None, timeout: float | None = None, poll: float = 1.0
) -> str:
    """Poll until the job ends; its final status (``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
    c, deadline = client(address), None if timeout is None else time.monotonic() + timeout
    while (state := str(c.get_job_status(job_id))) not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(poll)
    return state


def logs(
    job_id: str, follow: bool = False, address: str | None = None, out: IO[str] | None = None
) -> str | None:
    """The job's logs so far; with ``follow``, stream them to ``out`` until the job ends and
    return its final status."""
    c = client(address)
    if not follow:
        return c.get_job_logs(job_id)
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):  # the server closes it at the end
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as err:  # connection lost: the status still tells how it ended
        log.warning("log stream of %s broke off: %s", job_id, err)
    return wait_for(job_id, address)


def stop(job_id: str, wait: bool = False, address: str | None = None, timeout: float = 60) -> str:
    """Ask the job to stop: SIGTERM to the driver, which has the workers checkpoint the step
    in progress and end the run (``service.train.stopping``); Ray SIGKILLs it after
    ``RAY_JOB_STOP_WAIT_TIME_S`` (set at submission). Returns the status after that."""
    c = client(address)
    c.stop_job(job_id)
    return wait_for(job_id, address, timeout) if wait else str(c.get_job_status(job_id))
