"""``dino stack up|down``: a local Ray head, S3-compatible server and MLflow server (needs
``pip install 'dino-service[stack]'``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="local Ray head + S3-compatible server + MLflow server")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--state-dir", default=".dino-stack")
    p.set_defaults(fn=cmd_stack)


def cmd_stack(args: argparse.Namespace) -> int:
    from service.devtools import stack

    return stack.main([args.action, "--state-dir", args.state_dir])
