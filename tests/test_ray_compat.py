"""Each private Ray API of ``service.train.ray_compat`` against the installed Ray: an upgrade
that removes or renames one fails here, naming it, instead of deep inside a training run.
In process: imports and signatures only, no Ray started."""

from __future__ import annotations

import inspect
import logging
import pickle
import re
from pathlib import Path

import pytest

from service.train import ray_compat

REPO = Path(__file__).resolve().parents[1]


def ray_version() -> str:
    import ray

    return ray.__version__


def removed(what: str) -> str:
    return (f"Ray {ray_version()} no longer has {what}, which service/train/ray_compat.py "
            f"uses (read and tested on Ray {'.'.join(map(str, ray_compat.TESTED_RAY))}); "
            "adapt ray_compat.py or keep Ray within the range pinned in pyproject.toml")


def test_the_installed_ray_is_in_the_pinned_range():
    spec = re.search(r'"ray\[[^\]]*\]([^"]*)"', (REPO / "pyproject.toml").read_text()).group(1)
    from packaging.specifiers import SpecifierSet

    assert ray_version() in SpecifierSet(spec), f"Ray {ray_version()} is outside {spec}"
    assert tuple(int(x) for x in ray_version().split(".")[:2]) == ray_compat.TESTED_RAY


def test_torch_backend_has_the_hook_the_sigterm_handler_rides_on():
    backend = ray_compat.torch_backend()
    assert callable(getattr(backend, "on_training_start", None)), removed(
        "ray.train.torch.config._TorchBackend.on_training_start")
    params = list(inspect.signature(backend.on_training_start).parameters)
    assert params[1:3] == ["worker_group", "backend_config"], removed(
        f"_TorchBackend.on_training_start(worker_group, backend_config) (now {params})")


def test_controller_callback_and_state_names():
    cb = ray_compat.controller_callback()
    for hook in ("after_controller_state_update", "before_controller_execute_resize_decision"):
        assert callable(getattr(cb, hook, None)), removed(f"ControllerCallback.{hook}")
    from ray.train.v2._internal.execution.controller import state

    for name in (ray_compat.RUNNING_STATE, ray_compat.RESIZING_STATE,
                 ray_compat.SCHEDULING_STATE):
        assert inspect.isclass(getattr(state, name, None)), removed(f"controller state {name}")


def test_internal_kv_functions():
    from ray.experimental import internal_kv

    for name in ("_internal_kv_get", "_internal_kv_put", "_internal_kv_initialized"):
        assert callable(getattr(internal_kv, name, None)), removed(f"internal_kv.{name}")
    assert "overwrite" in inspect.signature(internal_kv._internal_kv_put).parameters, removed(
        "internal_kv._internal_kv_put(..., overwrite=)")
    assert ray_compat.kv_get("dino:no-such-key") is None  # no Ray connected: None, no error


def test_the_trainer_registers_its_sigint_handler_where_we_wrap_it():
    from ray.train.torch import TorchTrainer

    assert callable(getattr(TorchTrainer, "_register_sigint_handler", None)), removed(
        "DataParallelTrainer._register_sigint_handler")
    seen = []
    chained = ray_compat.chain_sigint_handler(TorchTrainer, lambda: seen.append(1))
    assert issubclass(chained, TorchTrainer)
    assert "_register_sigint_handler" in vars(chained)


def test_worker_errors_come_out_of_ray_trains_wrappers():
    """Ray Train's report of a worker's error, as it reaches the driver (pickled, as Ray
    carries it): the worker's own error comes out, rank 0's first."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from dino_core.step import NonFiniteLossError

    mine = NonFiniteLossError(11, float("nan"))
    wrapped = {1: UserExceptionWithTraceback(ValueError("rank 1"), "tb 1"),
               0: UserExceptionWithTraceback(mine, "Traceback ...")}
    report = pickle.loads(pickle.dumps(WorkerGroupError("Training failed", wrapped)))
    got = ray_compat.worker_error(report)
    assert isinstance(got, NonFiniteLossError) and got.step == 11, removed(
        "WorkerGroupError.worker_failures of UserExceptionWithTraceback._base_exc")
    assert isinstance(ray_compat.worker_error(ControllerError(mine)), NonFiniteLossError)
    assert ray_compat.worker_error(ValueError("not Ray's")) is None


def test_noisy_logger_names_exist():
    import ray  # noqa: F401  (the loggers are created at import)

    for name in ray_compat.NOISY_LOGGERS:
        assert name in logging.Logger.manager.loggerDict, removed(f"the logger {name}")


@pytest.mark.parametrize("name", ["RAY_DISABLE_WORKER_LOG_PREFIX", "RAY_DEDUP_LOGS_SKIP_REGEX",
                                  "RAY_DEDUP_LOGS_ALLOW_REGEX"])
def test_the_log_settings_the_cli_sets_are_still_read(name):
    """``service.cli.main.output_environment`` sets these before ``import ray``."""
    import ray._private.ray_constants as rc
    from ray._private import ray_logging

    assert hasattr(rc, name) or hasattr(ray_logging, name), removed(f"the setting {name}")
