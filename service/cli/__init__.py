"""The ``dino`` command line, one module per command group; ``main`` is the entry point."""

from service.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
