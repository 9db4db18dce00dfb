"""The errors that bad input raises, one class per kind of input; a leaf module.

``service.cli.main`` maps each to one ``dino: ...`` line and an exit code, in one place.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class StorageError(RuntimeError):
    """Storage stayed unreachable through every retry, or refused (not found, no access)."""


class CheckpointError(RuntimeError):
    """The checkpoint is missing, incomplete or damaged."""


class RunInUseError(RuntimeError):
    """Another driver is training this run now."""


class DataError(ValueError):
    """The training or evaluation data cannot be read as asked (missing, empty, unlabeled)."""


class MissingExtraError(RuntimeError):
    """A development tool needs a package of an optional extra that is not installed."""


class RunStopped(RuntimeError):
    """The run was stopped on request (``dino jobs stop``, SIGTERM to the driver) after a
    checkpoint of its last step; the same run name resumes from it."""


def is_project_error(err: BaseException) -> bool:
    """An error of a class this project defines (here, or beside the code that raises it, as
    ``dino_core.step.NonFiniteLossError``): its message is written for the user, and the
    command line prints it as one ``dino: ...`` line (``-v``: the traceback)."""
    return type(err).__module__.split(".", 1)[0] in ("service", "dino_core")
