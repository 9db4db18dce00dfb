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
    cfg = load_config(args.preset, args.config, args.overrides)
    text = to_yaml(cfg)
    if "run_name" not in cfg.model_fields_set:  # as `dino train` would name it
        text = text.replace(f"run_name: {cfg.run_name}\n",
                            "run_name: dino-<UTC time>-<hex>  # a fresh name for each "
                            "`dino train` (none given)\n", 1)
    print(text, end="")
    return 0
