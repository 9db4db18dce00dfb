"""``dino submit`` and ``dino jobs``: run train, tune or embed as Ray jobs on a running
cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.cli import embed as embed_cli
from service.cli import train as train_cli
from service.cli import tune as tune_cli
from service.cli.common import verbose_everywhere
from service.config import load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    address = "job API URL (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, " \
              "http://127.0.0.1:8265)"
    p = sub.add_parser("submit", help="run train/tune/embed as a Ray job on a running cluster",
                       epilog="e.g. `dino submit --address http://head:8265 train --preset "
                              "quickstart optim.lr=1e-3`. Storage and MLflow settings go with "
                              "the job; credentials do not (see service/cluster/env.py).")
    p.add_argument("--address", help=address)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--working-dir", metavar="DIR",
                     help="upload DIR as the job's working dir (default: this project)")
    src.add_argument("--installed", action="store_true",
                     help="use the dino installed on the cluster image; upload nothing")
    p.add_argument("--pass-secrets", action="store_true",
                   help="also send AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY: readable by "
                        "anyone with dashboard access; for throwaway clusters only")
    p.add_argument("--job-id", help="submission id (default: generated)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0,
                   help="CPUs reserved for the job's driver (default 0: it only waits)")
    p.add_argument("--wait", "--follow", dest="wait", action="store_true", default=True,
                   help="stream the logs until the job ends; exit 0 if it SUCCEEDED (default)")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="print the job id and return")
    p.add_argument("target", choices=["train", "tune", "embed"], help="what the job runs")
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="its arguments, as for `dino train|tune|embed` (paths are the "
                        "cluster's: a folder must be on every node, or be a URL)")
    p.set_defaults(fn=cmd_submit)

    jb = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    jb_sub = jb.add_subparsers(dest="jobs_command", required=True)
    for name, text in [("list", "every job of the cluster"), ("status", "a job's status"),
                       ("logs", "a job's logs"), ("stop", "stop a job")]:
        p = jb_sub.add_parser(name, help=text)
        p.add_argument("--address", help=address)
        if name != "list":
            p.add_argument("job_id", metavar="JOB_ID")
        if name in ("list", "status"):
            p.add_argument("--json", action="store_true", help="the full job info as JSON")
        p.set_defaults(fn=cmd_jobs)
    jb_sub.choices["logs"].add_argument("--follow", "-f", action="store_true",
                                        help="stream until the job ends; exit 0 if SUCCEEDED")
    jb_sub.choices["stop"].add_argument("--no-wait", action="store_true",
                                        help="return without waiting for the job to end")


def build_parser() -> argparse.ArgumentParser:
    """The ``train``, ``tune`` and ``embed`` commands alone, to check a job's arguments here."""
    parser = argparse.ArgumentParser(prog="dino")
    sub = parser.add_subparsers(dest="command", required=True)
    train_cli.add_parser(sub)
    tune_cli.add_parser(sub)
    embed_cli.add_parser(sub)
    verbose_everywhere(parser)
    return parser


def cluster_args(command: str, args: list[str]) -> list[str]:
    """``[command, *args]`` with ``ray.address=auto`` as the last override, checked locally.

    The overrides are one positional run (argparse accepts no second run), so the address
    goes right after them, not simply at the end. Bad arguments or config values fail here,
    before the cluster is asked for anything.
    """
    args = args[1:] if args[:1] == ["--"] else list(args)
    ns = build_parser().parse_args([command, *args])
    if command == "embed":
        return embed_args(ns, args)
    n, at = len(ns.overrides), len(args)
    if ns.overrides:
        at = max(i for i in range(len(args) - n + 1) if args[i : i + n] == ns.overrides) + n
    out = [command, *args[:at], "ray.address=auto", *args[at:]]
    if build_parser().parse_args(out).overrides != [*ns.overrides, "ray.address=auto"]:
        raise ValueError(f"cannot place ray.address=auto among {args}")
    if ns.config is None or Path(ns.config).is_file():  # else a path on the cluster
        load_config(ns.preset, ns.config, [*ns.overrides, "ray.address=auto"])
    return out


def embed_args(ns: argparse.Namespace, args: list[str]) -> list[str]:
    """``embed`` with ``--address auto`` (the job's cluster); ``--address`` and ``--num-cpus``
    of the command are refused (they pick or size a Ray of its own), and so is a bad
    ``--features``, before the cluster is asked for anything. The checkpoint, data and out
    are the cluster's paths or URLs: they are checked there."""
    from service.embed.spec import check_features

    for flag, value in (("--address", ns.address), ("--num-cpus", ns.num_cpus)):
        if value is not None:
            raise ValueError(f"{flag} is not for a job: it runs on the cluster it is "
                             "submitted to")
    check_features(ns.features)  # a ConfigError is a ValueError: one `dino submit:` line
    return ["embed", *args, "--address", "auto"]


def cmd_submit(args: argparse.Namespace) -> int:
    from service.cluster import jobs

    try:
        job_id = jobs.submit(args.address, cluster_args(args.target, args.args),
                             working_dir=args.working_dir, use_installed_package=args.installed,
                             job_id=args.job_id, entrypoint_num_cpus=args.entrypoint_num_cpus,
                             pass_secrets=args.pass_secrets)
    except ValueError as err:
        print(f"dino submit: {err}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError) as err:  # no cluster there, refused token, ...
        print(f"dino submit: {err}", file=sys.stderr)
        return 1
    print(job_id, flush=True)
    if not args.wait:
        return 0
    state = jobs.logs(job_id, follow=True, address=args.address)
    print(f"[dino] job {job_id} {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from service.cluster import jobs

    try:
        if args.jobs_command == "list":
            found = jobs.list_jobs(args.address)
            if args.json:
                print(json.dumps([j.model_dump(mode="json") for j in found]))
            for j in [] if args.json else found:
                print(f"{j.submission_id or j.job_id}  {j.status!s:<9}  {j.entrypoint}")
            if not found and not args.json:
                print(f"no jobs on {jobs.resolve_address(args.address)}")
        elif args.jobs_command == "status":
            info = jobs.status(args.job_id, args.address)
            if args.json:
                print(json.dumps(info.model_dump(mode="json")))
            else:
                print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
        elif args.jobs_command == "logs":
            text = jobs.logs(args.job_id, follow=args.follow, address=args.address)
            if args.follow:  # streamed; text is the final status
                return 0 if text == "SUCCEEDED" else 1
            print(text, end="")
        else:
            state = jobs.stop(args.job_id, wait=not args.no_wait, address=args.address)
            print(f"{args.job_id}: {state}")
    except (ConnectionError, RuntimeError, TimeoutError) as err:  # also: no such job
        print(f"dino jobs {args.jobs_command}: {err}", file=sys.stderr)
        return 1
    return 0
