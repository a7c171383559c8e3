"""Helpers shared by every part of fm9g (standard library only): atomic writes, JSON reads, and
the short name lists that error messages use.

A file is written under a temporary name in its destination folder and renamed over the
destination only once it is complete, so an interrupted write never leaves a half-written file
and never damages the previous version.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "default_permissions", "name_list", "read_json"]


def default_permissions(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Give `path` the permissions a plain `open()` / `mkdir()` would (mkstemp / mkdtemp make
    private 0600 / 0700 entries)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on normal exit it replaces `path`, on an error it
    is removed and `path` is left as it was.

    Example:
        >>> with atomic_file("ckpt.pt") as tmp:   # doctest: +SKIP
        ...     torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike[str], *, expect: type = dict, error: type[Exception] = ValueError) -> Any:
    """Parse the JSON file `path`, which must hold an `expect` (dict or list).

    Raises:
        FileNotFoundError: `path` does not exist.
        error: invalid JSON (naming the file, line and column) or a top-level value of another type.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(data, expect):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise error(f"{path}: expected {kind}, got {type(data).__name__}")
    return data


def name_list(names: list[str], limit: int = 10, *, quote: bool = False) -> str:
    """``"a, b, c, ... (7 more)"``: the first `limit` names for an error message (repr-quoted if `quote`)."""
    shown = ", ".join(repr(n) if quote else str(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
