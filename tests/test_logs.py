"""Our log records in a Ray worker process become ``[dino]`` lines (the only worker lines the
driver shows by default); in any other process nothing changes. In process: the worker is
told apart by its ``sys.argv``, which is patched here."""

from __future__ import annotations

import logging
import sys

import pytest

from service import logs
from service.cli.main import output_environment


@pytest.fixture
def project_loggers():
    """The project loggers' state, restored after the test."""
    saved = {n: (lg.level, lg.propagate, list(lg.handlers))
             for n in logs.PROJECT_LOGGERS for lg in [logging.getLogger(n)]}
    yield
    for name, (level, propagate, handlers) in saved.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.propagate = propagate
        lg.handlers[:] = handlers


def test_in_a_ray_worker_our_warnings_are_dino_lines_once(project_loggers, monkeypatch, capfd):
    monkeypatch.setattr(sys, "argv", ["/x/ray/_private/workers/default_worker.py", "--a"])
    monkeypatch.setattr(sys, "__stderr__", sys.stderr)  # capfd's stderr
    logs.route_worker_logs()
    logs.route_worker_logs()  # a second call adds no second handler
    logging.getLogger("service.storage.retry").warning("storage %s: retry %d", "s3://b", 2)
    logging.getLogger("dino_core.data.folder").info("not shown below WARNING")
    logging.getLogger("ray.train").warning("not ours: left to Ray")
    err = capfd.readouterr().err.splitlines()
    assert err.count("[dino] WARNING service.storage.retry: storage s3://b: retry 2") == 1, err
    assert not any("not shown" in ln for ln in err)


def test_elsewhere_nothing_changes(project_loggers, monkeypatch, caplog):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/dino", "train"])
    logs.route_worker_logs()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("service.data.raydata").warning("skipping unreadable image x")
    assert [r.getMessage() for r in caplog.records] == ["skipping unreadable image x"]
    assert not any(isinstance(h, logs._DinoLines)
                   for n in logs.PROJECT_LOGGERS for h in logging.getLogger(n).handlers)


def test_the_driver_shows_only_our_worker_lines_unless_verbose():
    quiet = output_environment(verbose=False, tty=True)
    assert quiet["RAY_DISABLE_WORKER_LOG_PREFIX"] == "1" and quiet["RAY_COLOR_PREFIX"] == "0"
    assert quiet["RAY_DEDUP_LOGS_SKIP_REGEX"] == "^" and quiet["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    import re

    allow = re.compile(quiet["RAY_DEDUP_LOGS_ALLOW_REGEX"])
    assert allow.search("[dino] WARNING service.storage.retry: x") and not allow.search("INFO x")
    assert output_environment(verbose=True, tty=False)["RAY_COLOR_PREFIX"] == "0"
    assert output_environment(verbose=True, tty=True)["RAY_COLOR_PREFIX"] == "1"
    assert "RAY_DEDUP_LOGS_SKIP_REGEX" not in output_environment(verbose=True, tty=True)


def test_a_command_leaves_the_environment_as_it_found_it(monkeypatch, capsys):
    """The quiet settings are for the command's own run: a later command in the same process
    (a test that runs ``dino -v`` next, a process started afterwards) does not inherit them."""
    from service.cli.main import main

    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # the user's own: kept
    assert main(["config", "--preset", "quickstart"]) == 0
    import os

    assert "RAY_DEDUP_LOGS_SKIP_REGEX" not in os.environ
    assert os.environ["RAY_COLOR_PREFIX"] == "1"
