"""The ``dino`` command line: the parser of every command group, and the one convention for
errors: a result, or one ``dino: <what went wrong>`` line and a non-zero exit code (``-v``
shows the traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service.cli import config, data, evaluate, jobs, stack, train, tune
from service.cli.common import EPILOG_OVERRIDES
from service.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MissingExtraError,
    RunInUseError,
    StorageError,
)

# exit 2: the input was wrong and nothing was started; exit 1: something failed on the way
EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (ConfigError, 2),
    (MissingExtraError, 2),
    (RunInUseError, 1),
    (CheckpointError, 1),
    (StorageError, 1),
    (DataError, 1),
    (FileNotFoundError, 1),
    (ValueError, 1),
)
# these messages say everything; for the others the class name says what kind of input failed
PLAIN = (ConfigError, MissingExtraError, RunInUseError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino", description="DINO self-supervised pretraining on Ray.", epilog=EPILOG_OVERRIDES
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, Ray's own output and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, tune, config, evaluate, data, stack, jobs):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ray folds lines that differ only in numbers across processes ("[repeated 2x across
    # cluster]"): a restarted worker's progress lines would vanish. Read at `import ray`.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except Exception as err:
        code = next((c for kind, c in EXIT_CODES if isinstance(err, kind)), None)
        if code is None or args.verbose:
            raise
        plain = isinstance(err, PLAIN)
        print(f"dino: {err}" if plain else f"dino: {type(err).__name__}: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
