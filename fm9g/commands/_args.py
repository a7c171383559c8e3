"""Command-line helpers shared by the sub-commands: an argument that is given either positionally
(fm9g's form) or by the original FM9G script's flag (``--path``, ``--bmtrain-ckpt-path``, ...).

Both forms store into the same ``dest``; giving both is refused, giving neither is reported by
:func:`require_given` (which ``fm9g.cli.main`` calls after parsing) as ``fm9g <command>: error: ...``
(exit status 2).
"""
from __future__ import annotations

import argparse
from typing import Any


class UsageError(ValueError):
    """A required argument is missing (neither its positional form nor its flag was given)."""


class _StoreOnce(argparse.Action):
    """``store``, refusing a second value for the same destination (positional and flag both given)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{self.metavar} given twice: pass it positionally or as "
                         f"{_flag_names(namespace, self.dest)}, not both")
        setattr(namespace, self.dest, values)


def _flag_names(namespace: argparse.Namespace, dest: str) -> str:
    return "/".join(getattr(namespace, "_fm9g_flags", {}).get(dest, []))


def positional_or_flag(parser: argparse.ArgumentParser, dest: str, *flags: str, metavar: str, help: str) -> None:
    """Add `dest` as an optional positional ``METAVAR`` and as the option(s) `flags` (aliases of one
    setting: same ``dest``, no second code path).

    Args:
        parser: the sub-command's parser.
        dest: the attribute name in the parsed namespace (``None`` when neither form was given).
        flags: the original script's option strings, e.g. ``"--path"`` or ``"-i", "--bmtrain-ckpt-path"``.
        metavar: the positional's name in usage and help.
        help: the help text (the flags are appended to it).
    """
    registry = parser.get_default("_fm9g_flags") or {}
    registry[dest] = [f for f in flags if f.startswith("--")] or list(flags)
    parser.set_defaults(_fm9g_flags=registry)
    parser.add_argument(dest, nargs="?", default=argparse.SUPPRESS, metavar=metavar, action=_StoreOnce,
                        help=f"{help} (or {'/'.join(flags)})")
    parser.add_argument(*flags, dest=dest, default=None, metavar=metavar, action=_StoreOnce,
                        help=f"the original FM9G flag for {metavar}")


def require_given(args: argparse.Namespace) -> None:
    """Raise :class:`UsageError` naming each argument added by :func:`positional_or_flag` that was
    given in neither form.

    Raises:
        UsageError: e.g. ``the following arguments are required: SRC (or --path)``.
    """
    missing = [d for d in getattr(args, "_fm9g_flags", {}) if getattr(args, d, None) is None]
    if missing:
        names = [f"{d.upper()} (or {_flag_names(args, d)})" for d in missing]
        raise UsageError("the following arguments are required: " + ", ".join(names))
