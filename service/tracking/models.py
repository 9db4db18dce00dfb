"""The run's backbone as an MLflow model: artifact path ``backbone`` of the run, a pyfunc
(``service.tracking.backbone_pyfunc``) with a signature, and optionally a version of it in
the Model Registry (``train.register_model``).

Saved locally with ``mlflow.pyfunc.save_model`` and uploaded with the run's own client, so
nothing depends on MLflow's process-wide tracking URI or active run: the same code serves a
Ray worker, the driver and a test process holding several runs. ``runs:/<run id>/backbone``
then loads it (``mlflow.pyfunc.load_model``, ``mlflow models serve``) and registers it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from service.tracking.base import Tracker

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

MODEL_PATH = "backbone"  # the model's artifact path in the run
CODE = Path(__file__).with_name("backbone_pyfunc.py")
# what the model's code imports besides dino_core (the project: installed where it is served)
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow")


def requirements() -> list[str]:
    """The model's pip requirements, pinned to this environment's versions."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def log_backbone_model(tracker: Tracker, weights: str | Path, embed_dim: int,
                       metadata: Mapping[str, str], register_as: str | None = None) -> str | None:
    """Logs the exported backbone file ``weights`` as the run's model ``backbone`` and, with
    ``register_as``, registers it under that name (a new version).

    Args:
        tracker: the run; nothing is logged when it tracks none (``uri`` or ``run_id`` None:
            tracking off, a rank > 0, a server that never answered).
        weights: a local ``.safetensors`` file written by ``save_backbone``.
        embed_dim: D of the model's output ``(N, D)`` (its signature).
        metadata: strings for the model's MLmodel file (the image size it expects, ...).
        register_as: a Model Registry name, or None.

    Returns:
        ``runs:/<run id>/backbone``, or None when nothing was logged. A failure is a warning:
        tracking never stops a run (the backbone file is in the run's storage anyway).
    """
    if tracker.uri is None or tracker.run_id is None:
        return None
    try:
        return _log(tracker.uri, tracker.run_id, weights, embed_dim, metadata, register_as)
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        log.warning("MLflow at %s: the backbone model was not logged%s: %s", tracker.uri,
                    f" nor registered as {register_as}" if register_as else "", err)
        return None


def _log(uri: str, run_id: str, weights: str | Path, embed_dim: int,
         metadata: Mapping[str, str], register_as: str | None) -> str:
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types import Schema, TensorSpec

    from service.tracking.backbone_pyfunc import WEIGHTS

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]),
    )
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with tempfile.TemporaryDirectory(prefix="dino-model-") as d, warnings.catch_warnings():
        # an input example would be a full image as JSON (150,528 numbers at 224 px) in every
        # run; the signature and the metadata say what the model takes
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        local = os.path.join(d, MODEL_PATH)
        mlflow.pyfunc.save_model(local, python_model=str(CODE),
                                 artifacts={WEIGHTS: str(weights)}, signature=signature,
                                 pip_requirements=requirements(), metadata=dict(metadata))
        client.log_artifacts(run_id, local, MODEL_PATH)
    if register_as:
        version_ = register(client, register_as, run_id)
        client.set_tag(run_id, "dino.registered_model", f"{register_as}/{version_}")
        log.info("registered %s version %s (run %s)", register_as, version_, run_id)
    return f"runs:/{run_id}/{MODEL_PATH}"


def register(client: MlflowClient, name: str, run_id: str) -> str:
    """A new version of the registered model ``name`` (created if new) whose source is the
    run's ``backbone`` artifact; returns its version number."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_PATH}"
    return str(client.create_model_version(name, source, run_id).version)
