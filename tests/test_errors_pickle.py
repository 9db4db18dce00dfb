"""Every error class of the project survives pickling: Ray carries an error raised in a
worker to the driver that way, and an error that cannot be rebuilt reaches the user as
Ray's ``TypeError`` about its constructor instead of its own message (issue 27, item 2).

The classes are found in the source, so a new one is tested without being listed here."""

from __future__ import annotations

import importlib
import math
import pickle
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLASS = re.compile(r"^class (\w+)\((\w*(?:Error|Exception)|RunStopped|Preempted)\):", re.M)
# the arguments of the classes whose constructor takes more than a message
ARGS = {"NonFiniteLossError": (11, math.inf)}


def error_classes() -> list[tuple[str, str]]:
    """``(module, class name)`` of every exception class defined in dino_core and service."""
    found = []
    for package in ("dino_core", "service"):
        for path in sorted((REPO / package).rglob("*.py")):
            for m in CLASS.finditer(path.read_text()):
                module = ".".join(path.relative_to(REPO).with_suffix("").parts)
                found.append((module.removesuffix(".__init__"), m.group(1)))
    return found


def test_the_source_scan_finds_the_known_classes():
    names = {name for _, name in error_classes()}
    assert {"NonFiniteLossError", "ConfigError", "StorageError", "DataError", "RunStopped",
            "Preempted"} <= names


@pytest.mark.parametrize(("module", "name"), error_classes(), ids=lambda v: v)
def test_every_error_class_pickles_with_its_message_and_fields(module, name):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, BaseException)
    err = cls(*ARGS.get(name, ("what went wrong",)))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err)
    assert back.__dict__ == err.__dict__
