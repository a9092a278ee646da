"""``flowkit`` command line. Each command lives in its own module and registers itself here.

A command module defines ``register(subparsers)`` adding a sub-parser whose ``func``
default takes the parsed ``args`` and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

# one line per command module; a module missing here is simply not offered
COMMAND_MODULES = (
    "flowkit.commands.check",
    "flowkit.commands.demo",
    "flowkit.commands.fit2d",
    "flowkit.commands.train",
    "flowkit.commands.evaluate",
    "flowkit.commands.sample",
    "flowkit.commands.analyze",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowkit", description="Compose, verify and train normalizing flows.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
