"""Every private Ray API this project uses, in one place.

Ray Train V2 gives no public hook for four things the service needs, so it reaches into
Ray's internals for them; each is named here, and ``tests/test_ray_compat.py`` checks each
against the installed Ray, so that an upgrade that removes one fails with a message naming
it instead of deep inside a run. ``pyproject.toml`` pins the Ray range those tests passed on.

- ``TorchBackend``: Ray Train's torch backend, subclassed to set the workers' SIGTERM handler
  on their main thread before training starts (``service.train.backend``).
- ``ControllerCallback`` and the controller's state names: the hook before a resize of an
  elastic group (``service.train.resize``).
- ``kv_get`` / ``kv_put``: Ray's internal key-value store, where the resize hook and rank 0
  exchange a request id (``service.train.stopping``).
- ``chain_sigint_handler``: the trainer's ``_register_sigint_handler``, wrapped so that
  Ctrl-C is told apart from a normal end (``service.train.driver``).
- ``worker_error``: the exception a training worker raised, out of Ray Train's wrappers.
- ``NOISY_LOGGERS``: Ray's logger names whose start-up notices the driver silences.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

TESTED_RAY = (2, 60)  # the Ray minor version these names were read in and tested on

# Ray Train V2 controller states around a resize (``ray.train.v2._internal.execution.
# controller.state``), compared by class name: the module is private
RUNNING_STATE, RESIZING_STATE, SCHEDULING_STATE = "RunningState", "ResizingState", "SchedulingState"

# Ray's own lines that a user of `dino train` does not act on; `dino -v` brings them back
NOISY_LOGGERS = (
    # "Token authentication is enabled for this Ray cluster ...": the default, said at each start
    "ray._private.authentication.authentication_token_setup",
)


def torch_backend() -> type:
    from ray.train.torch.config import _TorchBackend

    return _TorchBackend


def controller_callback() -> type:
    from ray.train.v2._internal.execution.callback import ControllerCallback

    return ControllerCallback


def kv_get(key: str) -> bytes | None:
    """The value at ``key`` in Ray's internal KV; None when absent, and in a process without
    Ray (the loop run in process never imports Ray for it)."""
    if "ray" not in sys.modules:
        return None
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key) if internal_kv._internal_kv_initialized() else None


def kv_put(key: str, value: bytes) -> None:
    from ray.experimental import internal_kv

    if internal_kv._internal_kv_initialized():
        internal_kv._internal_kv_put(key, value, overwrite=True)


def chain_sigint_handler(trainer_cls: type, on_sigint: Callable[[], None]) -> type:
    """``trainer_cls`` whose SIGINT handler (Ray Train's graceful abort, registered in
    ``fit()`` on the main thread) calls ``on_sigint`` first."""

    class Chained(trainer_cls):  # type: ignore[misc, valid-type]
        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)
            ray_handler = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                on_sigint()
                if callable(ray_handler):
                    ray_handler(signum, frame)

            signal.signal(signal.SIGINT, handler)

    return Chained


def worker_error(err: BaseException) -> BaseException | None:
    """The exception a training worker (or Ray Train's controller) raised, when ``err`` is
    Ray Train's report of it: ``WorkerGroupError.worker_failures`` (rank -> the worker's
    error, wrapped with its traceback text in a private class) or
    ``ControllerError.controller_failure``. Rank 0's error first, the lowest rank otherwise;
    None when ``err`` is not such a report."""
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return unwrap(failures[min(failures)])
    failure = getattr(err, "controller_failure", None)
    if isinstance(failure, BaseException):
        return unwrap(failure)
    return None


def unwrap(err: BaseException) -> BaseException:
    """The user's exception inside Ray Train's ``UserExceptionWithTraceback`` (its
    ``_base_exc``), or ``err`` itself."""
    base = getattr(err, "_base_exc", None)
    return base if isinstance(base, BaseException) else err
