"""The `fm9g` console script: `fm9g <command> ...` (also `python -m fm9g <command> ...`).

Each sub-command lives in its own module under :mod:`fm9g.commands` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``. The CLI is a thin view of the library.

A user-facing error (a bad config value, a missing file, an attention backend or a device that is
not available here, a refused checkpoint or conversion) is printed as one line,
``fm9g <command>: error: <message>``, with exit status 2 (as argparse does for a bad command line).
Set ``FM9G_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from fm9g import __version__
from fm9g.commands._args import require_given

# command name -> module under fm9g.commands
COMMANDS: dict[str, str] = {
    "build-index": "build_index",
    "train": "train",
    "convert": "convert",
    "inspect": "inspect",
    "plot": "plot",
    "inspect-data": "inspect_data",
    "chat": "chat",
}

# exit status of a user-facing error (argparse uses 2 for a bad command line, too)
USER_ERROR_EXIT = 2

# builtin exception types the library raises for the user's input (fm9g's own error classes,
# ConfigError, CheckpointError, ConversionError, AttentionUnavailableError..., are recognised by
# the module that defines them, see `is_user_error`)
_BUILTIN_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    """The `fm9g` parser with every sub-command whose module imports."""
    parser = argparse.ArgumentParser(prog="fm9g", description="Train FM9G (九格) language models.")
    parser.add_argument("--version", action="version", version=f"fm9g {__version__}")
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


def cuda_is_missing(err: BaseException) -> bool:
    """True when `err` is torch refusing CUDA on a machine without it (a CPU build of torch, or
    no GPU / driver), i.e. the user asked for ``device="cuda"`` where there is none."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(err, (AssertionError, RuntimeError)):
        return False
    return "cuda" in str(err).lower() and not torch.cuda.is_available()


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is about the user's input or machine (printed as one line) rather than a bug
    (shown with its traceback): the builtin input errors, any exception class defined in fm9g,
    and CUDA asked for where there is none."""
    if isinstance(err, _BUILTIN_USER_ERRORS):
        return True
    if type(err).__module__.split(".")[0] == "fm9g":
        return True
    return cuda_is_missing(err)


def error_message(err: BaseException) -> str:
    """The one-line text of a user-facing error."""
    if cuda_is_missing(err):
        return (f"CUDA is not available on this machine ({err}), but the run asks for it: set device to "
                "'auto' or 'cpu' in the config (or pass --set device=cpu), or run on a machine with a GPU")
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]  # str(KeyError) would quote the message
    return str(err)


def main(argv: list[str] | None = None) -> int:
    """Run one `fm9g` command and return its exit status (0 ok, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        require_given(args)
        return int(args._run(args) or 0)
    except Exception as err:
        if os.environ.get("FM9G_DEBUG", "") not in ("", "0") or not is_user_error(err):
            raise
        print(f"fm9g {args.command}: error: {error_message(err)}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
