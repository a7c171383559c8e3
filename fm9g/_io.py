"""Helpers shared by every part of fm9g (standard library only): the one configuration error,
atomic writes of files and folders, JSON reads, and the short name lists that error messages use.

A file (or folder) is written under a temporary name in its destination folder and renamed over
the destination only once it is complete, so an interrupted write never leaves a half-written
output and never damages the previous version.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["DuplicateKeyError", "json_duplicate_keys", "duplicate_key_text", "nearby_hint", "CHECKPOINT_NAME", "ConfigError", "atomic_dir", "find_model_file", "state_dict_mismatch", "atomic_file", "atomic_write_bytes", "atomic_write_text",
           "default_permissions", "name_list", "parse_bool", "read_json"]

# The original stack's file name of model weights: <folder>/fm9g_live_checkpoint-<step>.pt
CHECKPOINT_NAME = "fm9g_live_checkpoint"


class ConfigError(ValueError):
    """A configuration (model, training, LoRA, dataset mixture) is invalid; the message names the
    file and key. The one error class for every config of fm9g."""


# the spellings of a boolean accepted in every config file (any case); the original launcher wrote
# "True" / "False" and "1" / "0"
_TRUE_WORDS = ("true", "1")
_FALSE_WORDS = ("false", "0")


def parse_bool(value: object, key: str, source: str | None = None) -> bool:
    """A boolean from a config value: ``True`` / ``False``, the integers ``0`` / ``1`` (also as
    ``0.0`` / ``1.0``), or the strings ``"true"`` / ``"false"`` and ``"1"`` / ``"0"`` in any case
    (surrounding spaces ignored). The one parser of booleans for every fm9g config
    (model, training, LoRA, dataset mixture), so ``"false"`` never counts as true.

    Args:
        value: the value as read from the file.
        key: the key, named in the error.
        source: the file (or other origin) named in the error.
    Raises:
        ConfigError: any other value (``"maybe"``, ``"yes"``, ``2``, ``None``, a list ...).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
    where = f"{source}: " if source else ""
    raise ConfigError(f"{where}{key} must be true/false (or 1/0), got {value!r}")


def default_permissions(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Give `path` the permissions a plain `open()` / `mkdir()` would (mkstemp / mkdtemp make
    private 0600 / 0700 entries)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


class DiskFullError(OSError):
    """Writing `filename` failed because the disk is full or a size limit (disk quota, ``ulimit -f``)
    was hit. The message names the file and says what to do; `path` is that file, `reason` says
    which limit, `errno` is the OS error number when known."""

    def __init__(self, filename: str | os.PathLike[str], reason: str, code: int | None = None) -> None:
        super().__init__(f"cannot write {filename}: {reason}. Free some space (or raise the limit) and run "
                         "again, or write to another disk")
        self.errno, self.path, self.reason = code, Path(filename), reason  # (`filename` would change str())


__all__ += ["DiskFullError", "explain_disk_full"]

# errno -> what it means for a write
_NO_SPACE = {
    errno.ENOSPC: "the disk is full (no space left on the device)",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f) or the file system's largest file",
    errno.EDQUOT: "the disk quota is exceeded",
}
# what torch.save's zip writer says when the OS refuses a write (it does not pass the errno on)
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "basic_ios::clear: iostream error")
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # safetensors' save_file: "... (os error 28)"


def _no_space_reason(err: BaseException) -> tuple[str, int | None] | None:
    """(reason, errno) when `err`, or an error it was raised from or while handling (torch.save
    reports "unexpected pos" while closing after the failed write), is a write refused for lack of
    space or a size limit; else None."""
    seen: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(seen) < 8 and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(not isinstance(e, Exception) for e in seen):
        return None  # an interrupt (Ctrl-C, SIGTERM) cut the write: not a full disk
    for e in seen:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return _NO_SPACE[e.errno], e.errno
        found = _RUST_OS_ERROR.search(str(e))
        if found and int(found.group(1)) in _NO_SPACE:
            return _NO_SPACE[int(found.group(1))], int(found.group(1))
    for e in seen:
        text = str(e).strip()
        if isinstance(e, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILURES):
            return ("torch.save could not write the whole file: the disk is full or a size limit "
                    f"(disk quota, ulimit -f) was hit ({text.splitlines()[0]})"), None
    return None


def _shown_path(err: BaseException, written: Path, destination: Path) -> Path:
    """The destination name of the file `err` is about: a path inside the temporary `written`
    becomes the same path inside `destination`; no known path gives `destination` itself."""
    name = err.path if isinstance(err, DiskFullError) else getattr(err, "filename", None)
    if not name:
        return destination
    try:
        rel = Path(name).relative_to(written)
    except ValueError:
        return Path(name)
    return destination / rel if rel.parts else destination


def _raise_if_disk_full(err: BaseException, written: Path, destination: Path) -> None:
    """Raise `DiskFullError` naming the destination file when `err` is a disk-full / size-limit failure
    while writing `written` (a temporary file or folder standing for `destination`); else return."""
    if isinstance(err, DiskFullError):
        shown = _shown_path(err, written, destination)
        if shown != err.path:
            raise DiskFullError(shown, err.reason, err.errno) from err.__cause__
        return
    found = _no_space_reason(err)
    if found is not None:
        raise DiskFullError(_shown_path(err, written, destination), *found) from err


@contextmanager
def explain_disk_full(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a write of `path` refused for lack of space or a size limit into a `DiskFullError`
    naming `path`: an OSError ENOSPC / EFBIG / EDQUOT, torch.save's ``inline_container.cc ...
    unexpected pos`` / ``PytorchStreamWriter failed`` RuntimeError, safetensors' ``(os error 28)``.
    Other errors pass unchanged. `atomic_file` and `atomic_dir` do this for what they write.

    Example:
        >>> with explain_disk_full(path), open(path, "wb") as f:   # doctest: +SKIP
        ...     torch.save(state, f)
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        found = _no_space_reason(err)
        if found is None:
            raise
        raise DiskFullError(path, *found) from err


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on normal exit it replaces `path`, on an error it
    is removed and `path` is left as it was (a disk-full or size-limit failure is raised as a
    `DiskFullError` naming `path`).

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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(err, tmp, path)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *, tmp_prefix: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on normal exit it replaces `path` (an
    existing `path` is swapped out first and removed only after the new one is in place), on an
    error it is removed and `path` is left as it was (a disk-full or size-limit failure is raised
    as a `DiskFullError` naming the file inside `path`, or `path` when the file is not known).

    Args:
        path: the destination folder.
        tmp_prefix: name prefix of the temporary folder (default ``.<name>.tmp-``); callers that
            clean stale temporaries of their own use it to recognise them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=tmp_prefix or f".{path.name}.tmp-"))
    default_permissions(tmp, directory=True)
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, trash / "x")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(err, tmp, path)
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
        text = path.read_text(encoding="utf-8")
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except DuplicateKeyError as err:
        raise error(f"{path}: {duplicate_key_text(text, err.key)}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(data, expect):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise error(f"{path}: expected {kind}, got {type(data).__name__}")
    return data


class DuplicateKeyError(ValueError):
    """A JSON object sets one key twice (``json`` would silently keep the last value)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen[key] = value
    return seen


def json_duplicate_keys(text: str) -> list[str]:
    """The keys that some object of the JSON `text` sets more than once (``[]`` when none), each
    as :func:`duplicate_key_text` words it."""
    found: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [k for k, _ in pairs]
        found.extend(k for k in dict.fromkeys(names) if names.count(k) > 1)
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return [duplicate_key_text(text, k) for k in found]


def duplicate_key_text(text: str, key: str) -> str:
    """``key "tokenizer_path" is set twice in one object (lines 3, 9): JSON keeps only the last;
    remove one``."""
    pattern = re.compile(r'"' + re.escape(json.dumps(key)[1:-1]) + r'"\s*:')
    lines = [text.count("\n", 0, m.start()) + 1 for m in pattern.finditer(text)]
    where = f" (lines {', '.join(map(str, lines))})" if lines else ""
    return (f"key {json.dumps(key)} is set more than once in one object{where}: JSON would keep only the last "
            "value; remove the others")


def nearby_hint(path: str | os.PathLike[str], levels: int = 3) -> str:
    """Where a missing `path` may be meant: ``"; a folder of that name exists at /abs/x"``, found
    by keeping the last one or two parts of the path and trying them under the folders above it
    and the working directory (``""`` when none is found)."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    tails = [Path(p.name)] + ([Path(*p.parts[-2:])] if len(p.parts) > 2 else [])
    roots = list(p.parents)[1:levels + 1] + [Path.cwd()]
    for root in roots:
        for tail in tails:
            cand = root / tail
            if cand != p and cand.exists():
                kind = "folder" if cand.is_dir() else "file"
                return f"; a {kind} of that name exists at {cand}"
    return ""


def name_list(names: list[str], limit: int = 10, *, quote: bool = False) -> str:
    """``"a, b, c, ... (7 more)"``: the first `limit` names for an error message (repr-quoted if `quote`)."""
    shown = ", ".join(repr(n) if quote else str(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def find_model_file(folder: str | os.PathLike[str]) -> Path | None:
    """The one ``fm9g_live_checkpoint*.pt`` in `folder` (a checkpoint step folder), or None when
    there is none.

    Raises:
        FileExistsError: the folder holds several, naming them (pass the file itself).
    """
    found = sorted(Path(folder).glob(f"{CHECKPOINT_NAME}*.pt"))
    if len(found) > 1:
        raise FileExistsError(f"{folder} holds {len(found)} model files ({name_list([p.name for p in found])}); "
                              "pass the .pt file itself")
    return found[0] if found else None


def state_dict_mismatch(expected: dict[str, Any], got: dict[str, Any], *, source: str = "checkpoint") -> str | None:
    """Describe how the state dict `got` differs from `expected` (both name -> tensor, or name ->
    shape), or None when names and shapes agree. One sentence listing every missing, unexpected
    and mis-shaped key (the first few of each), for the error that callers raise.
    """
    def shape(v: Any) -> tuple[int, ...]:
        return tuple(getattr(v, "shape", v))

    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k}: {shape(got[k])} vs expected {shape(expected[k])}"
             for k in expected if k in got and shape(got[k]) != shape(expected[k])]
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} with another shape in {source}: " + name_list(wrong, 5))
    if missing:
        parts.append(f"{len(missing)} missing keys: {name_list(missing, 5)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {name_list(unexpected, 5)}")
    return "; ".join(parts) or None
