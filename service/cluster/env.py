"""Which environment variables a cluster job or a Ray worker gets: storage and MLflow
settings, never secrets (the runtime env, metadata and entrypoint of a job can be read by
anyone who can read the dashboard). A leaf module: it imports nothing of ours.

Secrets are ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``MLFLOW_TRACKING_TOKEN`` /
``PASSWORD``, Ray tokens, anything named like a secret, and URLs with ``user:password@``.
Cluster nodes get credentials from their own environment (a KubeRay pod ``envFrom`` a
Kubernetes Secret, an instance role / IRSA / workload identity). The opt-in ``pass_secrets``
sends ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (the key id only with its secret),
for throwaway test clusters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

FORWARDED = ("DINO_", "MLFLOW_", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "_KEY", "USERNAME")
PASSED_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


def _is_secret(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


def job_env(env: Mapping[str, str] = os.environ, pass_secrets: bool = False) -> dict[str, str]:
    """The variables the job gets: storage and MLflow settings, never secrets unless asked.

    Raises:
        ValueError: a forwarded value embeds ``user:password@`` and ``pass_secrets`` is off.
    """
    out = {k: v for k, v in env.items() if k.startswith(FORWARDED) and not _is_secret(k)}
    for key, value in out.items():
        if URL_WITH_PASSWORD.search(value) and not pass_secrets:
            raise ValueError(
                f"{key} embeds a password; give the cluster its credentials "
                "through its own environment, or use --pass-secrets"
            )
    if pass_secrets and env.get("AWS_SECRET_ACCESS_KEY"):
        out |= {k: env[k] for k in PASSED_SECRETS if env.get(k)}
    return out
