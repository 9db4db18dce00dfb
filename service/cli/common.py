"""Pieces every command module shares: config, weights and MLflow arguments, argument types,
parsing."""

from __future__ import annotations

import argparse
import sys

EPILOG_OVERRIDES = (
    "Any config key can be overridden as key=value, e.g. "
    "`dino train --preset quickstart data.path=/imgs train.epochs=5 optim.lr=1e-3`."
)


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named preset (see `dino presets`)")
    p.add_argument("--config", help="YAML file with config sections")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def flush_ray_logs() -> None:
    """Shuts the driver's Ray down before the summary: Ray's log deduplicator prints its
    held-back "[repeated Nx]" lines at shutdown, which otherwise land after ``--json``."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=["teacher", "student", "random"], default="teacher",
                   help="which backbone of the checkpoint; random: the same architecture "
                        "untrained, the baseline to compare against")


def mlflow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mlflow", action="store_true",
                   help="log results to the MLflow run that trained the checkpoint")
    p.add_argument("--tracking-uri", help="MLflow URI (default: the run's tracking.uri, "
                                          "then MLFLOW_TRACKING_URI, then the local default)")


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    return _int_at_least(text, 0)


def leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every command (``dino eval knn``, ``dino jobs list``, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for p in dict.fromkeys(a.choices.values()) for leaf in leaf_parsers(p)]


def verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` after the command too (``dino train -v``), not only before it; absent there, it
    leaves the top-level value alone."""
    for leaf in leaf_parsers(parser):
        leaf.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="debug logging, Ray's own output and tracebacks")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses, taking ``key=value`` overrides wherever they stand (``dino train --resume X
    run_name=y``): argparse accepts one run of a positional ``nargs='*'`` only."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    rest = [a for a in extra if a not in overrides]
    if rest or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def log_eval(args: argparse.Namespace, metrics: dict[str, float],
             artifacts: list[str] | None = None) -> int:
    """Logs an evaluation's metrics (and files) to the MLflow run of its checkpoint
    (``--mlflow``); 1 with one ``dino:`` line if that fails."""
    from service import api

    result = api.EvalResult(args.command, args.checkpoint, metrics, {})
    try:
        uri, run_id = api.log_evaluation(result, args.tracking_uri, artifacts or [])
    except (ValueError, RuntimeError) as err:
        print(f"dino: {err}", file=sys.stderr)
        return 1
    print(f"logged {len(metrics)} metrics and {len(artifacts or [])} files to MLflow {uri} "
          f"run {run_id}", file=sys.stderr)
    return 0
