"""Development tools, not needed to train: the local stack (``stack``: Ray head, moto's S3,
MLflow server) and the offline manifest validator (``k8s_validate``). Their extra packages
come with ``pip install 'dino-service[stack]'`` / ``'dino-service[k8s]'`` (both in ``dev``)."""

from __future__ import annotations

import importlib.util

from service.errors import MissingExtraError


def require(what: str, extra: str, *modules: str) -> None:
    """Raises MissingExtraError naming the extra to install if a module is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)}: "
                                f"pip install 'dino-service[{extra}]'")
