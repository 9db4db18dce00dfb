"""``dino config`` (the resolved config) and ``dino presets`` (their names)."""

from __future__ import annotations

import argparse

from service.cli.common import config_args
from service.config import load_config, preset_names, to_yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config without running it")
    config_args(p)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(fn=cmd_presets)



def cmd_presets(_: argparse.Namespace) -> int:
    print("\n".join(preset_names()))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.preset, args.config, args.overrides)), end="")
    return 0
