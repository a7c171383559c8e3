"""The `fm9g` console script: `fm9g <command> ...` (also `python -m fm9g <command> ...`).

Each sub-command lives in its own module under :mod:`fm9g.commands` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``. The CLI is a thin view of the library.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under fm9g.commands
COMMANDS: dict[str, str] = {
    "build-index": "build_index",
    "train": "train",
    "convert": "convert",
    "inspect": "inspect",
    "plot": "plot",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fm9g", description="Train FM9G (九格) language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"fm9g.commands.{module}")
        except ModuleNotFoundError as err:  # a command whose optional dependency is missing
            if err.name and err.name.startswith("fm9g.commands"):
                continue
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"fm9g {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
