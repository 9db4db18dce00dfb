"""The ``dino`` command line: the parser of every command group, and the one convention for
errors: a result, or one ``dino: <what went wrong>`` line and a non-zero exit code (``-v``
shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service.cli import config, data, embed, evaluate, jobs, search, stack, train, tune
from service.cli.common import EPILOG_OVERRIDES, parse, verbose_everywhere
from service.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MissingExtraError,
    RunInUseError,
    RunStopped,
    StorageError,
    is_project_error,
)

# exit 2: the input was wrong and nothing was started; exit 1: something failed on the way
EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (ConfigError, 2),
    (MissingExtraError, 2),
    (RunInUseError, 1),
    (RunStopped, 1),
    (CheckpointError, 1),
    (StorageError, 1),
    (DataError, 1),
    (FileNotFoundError, 1),
    (ValueError, 1),
)
# these messages say everything; for the others the class name says what kind of input failed
PLAIN = (ConfigError, MissingExtraError, RunInUseError, RunStopped)


def output_environment(verbose: bool, tty: bool) -> dict[str, str]:
    """What Ray and MLflow print in this process (they read these at import).

    By default only our own lines (``[dino] ...``) pass, as they are: without Ray's
    "(RayTrainWorker pid=...)" prefix and its colour codes, and never folded (Ray folds lines
    that differ only in numbers across processes, "[repeated 2x across cluster]", which would
    hide a restarted worker's progress lines). Everything else a Ray process prints is
    skipped: an error of a worker reaches the user as the driver's one ``dino: ...`` line.
    ``-v`` shows all of it, with the prefix, unfolded; colour only on a terminal."""
    if verbose:
        return {"RAY_DEDUP_LOGS": "0", "RAY_COLOR_PREFIX": "1" if tty else "0"}
    return {"RAY_DEDUP_LOGS": "1", "RAY_DEDUP_LOGS_ALLOW_REGEX": r"\[dino\]",
            "RAY_DEDUP_LOGS_SKIP_REGEX": "^", "RAY_DISABLE_WORKER_LOG_PREFIX": "1",
            "RAY_COLOR_PREFIX": "0",
            # MLflow's INFO lines ("Creating initial MLflow database tables") and the run
            # links it writes to stdout at a run's end (our summary names the run)
            "MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino", description="DINO self-supervised pretraining on Ray.", epilog=EPILOG_OVERRIDES
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, Ray's own output and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, tune, config, evaluate, data, embed, search, stack, jobs):
        module.add_parser(sub)
    verbose_everywhere(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    # read at `import ray` / `import mlflow`; the user's own settings win. Set for this command
    # only: a later main() in the same process (a test) must not inherit a quiet run's
    added = {k: v for k, v in output_environment(args.verbose, sys.stdout.isatty()).items()
             if k not in os.environ}
    os.environ.update(added)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code = _run(args)
    finally:
        for key in added:
            os.environ.pop(key, None)
    if argv is None and "faiss" in sys.modules and "pyarrow" in sys.modules:
        _exit_at_once(code)
    return code


def _exit_at_once(code: int) -> None:
    """Ends a process that loaded both faiss and pyarrow without the interpreter's teardown:
    there, 3-5% of such processes abort ("terminate called without an active exception",
    exit 134) after all their work is done (measured here with pyarrow and faiss alone, no
    code of ours; apache/arrow#34314)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    """The command, with errors as one ``dino: ...`` line and an exit code."""
    try:
        return args.fn(args)
    except Exception as err:
        code = next((c for kind, c in EXIT_CODES if isinstance(err, kind)), None)
        if code is None and is_project_error(err):
            code = 1
        if code is None or args.verbose:
            raise
        plain = isinstance(err, PLAIN)
        print(f"dino: {err}" if plain else f"dino: {type(err).__name__}: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
