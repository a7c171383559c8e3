"""Sample transforms: turn one raw record into the ``{"input", "output"}`` pair that is tokenized.

A transform is any callable ``transform(data, num_sample, r) -> dict | None`` where ``data`` is the
record read from the index, ``num_sample`` the number of in-context examples requested (0 unless the
dataset config sets ``incontext_weight``) and ``r`` a :class:`random.Random` owned by the loader.
It returns a dict with a string ``output`` and an optional string ``input`` (``None`` or missing
means ``""``), a chat record (``messages``, ShareGPT ``conversations`` or Alpaca ``instruction``:
see :mod:`fm9g.data.records`; it is rendered by the dataset's chat template), or ``None`` to skip
the record.

Built-in transforms (pass their name to :func:`load_transform`):

``identity``
    Passes ``input`` / ``output`` through unchanged (the original ``script_cpmc.py``).
``chatml``
    The seed's chat template (``dataset_configs/add_template.py``) with the role name **"user"**
    in lower case, so training prompts match what ``tokenizer.apply_chat_template`` produces at
    inference time (the original wrote ``"User"``)::

        input  = "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n"
                 "<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n"
        output = "{output}<|im_end|>"

``chatml-original``
    Byte-for-byte the original template (capital ``"User"``), to reproduce old runs.
``userai``
    The 2B/8B-era format: ``input = "<用户>{input}<AI>"``, output unchanged.

Anything else is a path to a Python file defining ``transform(data, num_sample, r)``; a relative
path is resolved against ``base_dir`` (the directory of the dataset-config JSON), as the original
loader did.
"""
from __future__ import annotations

import importlib.util
import inspect
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable

from fm9g._io import ConfigError, nearby_hint
from fm9g.data.records import is_chat_record

__all__ = [
    "TransformError",
    "TransformFn",
    "CHATML_SYSTEM_PROMPT",
    "identity",
    "chatml",
    "chatml_original",
    "userai",
    "BUILTIN_TRANSFORMS",
    "load_transform",
]

TransformFn = Callable[[dict, int, random.Random], "dict | None"]

CHATML_SYSTEM_PROMPT = "You are a helpful assistant."


class TransformError(ConfigError):
    """A transform file could not be loaded, or a transform returned something unusable (a
    :class:`fm9g._io.ConfigError`: the dataset config's ``transforms`` is at fault)."""


def _text(data: dict, key: str) -> str:
    value = data.get(key)
    return "" if value is None else value


def identity(data: dict, num_sample: int = 0, r: random.Random | None = None) -> dict:
    """Return ``{"input": data["input"] or "", "output": data["output"]}`` unchanged; a chat record
    (messages, ShareGPT, Alpaca) is returned as it is, for its chat template."""
    if is_chat_record(data):
        return data
    return {"input": _text(data, "input"), "output": data.get("output")}


def _chatml(data: dict, role: str) -> dict:
    prompt = (
        f"<|im_start|>system\n{CHATML_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>{role}\n{_text(data, 'input')}<|im_end|>\n<|im_start|>assistant\n"
    )
    return {"input": prompt, "output": f"{_text(data, 'output')}<|im_end|>"}


def chatml(data: dict, num_sample: int = 0, r: random.Random | None = None) -> dict:
    """ChatML with role ``user`` (matches Hugging Face chat templates); output ends with ``<|im_end|>``."""
    return _chatml(data, "user")


def chatml_original(data: dict, num_sample: int = 0, r: random.Random | None = None) -> dict:
    """The original ``add_template.py`` text exactly, including the capitalised role ``User``."""
    return _chatml(data, "User")


def userai(data: dict, num_sample: int = 0, r: random.Random | None = None) -> dict:
    """The 2B/8B-era prompt format ``<用户>{input}<AI>``; output unchanged."""
    return {"input": f"<用户>{_text(data, 'input')}<AI>", "output": _text(data, "output")}


BUILTIN_TRANSFORMS: dict[str, TransformFn] = {
    "identity": identity,
    "chatml": chatml,
    "chatml-original": chatml_original,
    "userai": userai,
}


def _check_result(result: Any, origin: str) -> dict | None:
    """Validate a transform's return value; raise :class:`TransformError` naming ``origin``."""
    if result is None:
        return None
    if not isinstance(result, dict):
        raise TransformError(
            f"{origin} returned {type(result).__name__}; it must return a dict with a string "
            f"'output' (and optional string 'input'), or None to skip the record"
        )
    if is_chat_record(result):  # a chat record: its chat template reads and checks it
        return result
    if "output" not in result:
        raise TransformError(
            f"{origin} returned a dict without 'output' (keys: {sorted(result)}); "
            f"return {{'input': str, 'output': str}}"
        )
    out = result["output"]
    if out is not None and not isinstance(out, str):
        raise TransformError(f"{origin} returned 'output' of type {type(out).__name__}; it must be a str")
    inp = result.get("input")
    if inp is not None and not isinstance(inp, str):
        raise TransformError(f"{origin} returned 'input' of type {type(inp).__name__}; it must be a str or None")
    return result


def _checked(fn: Callable[..., Any], origin: str) -> TransformFn:
    def transform(data: dict, num_sample: int, r: random.Random) -> dict | None:
        return _check_result(fn(data, num_sample, r), origin)

    transform.__name__ = getattr(fn, "__name__", "transform")
    transform.__doc__ = getattr(fn, "__doc__", None)
    transform.origin = origin  # type: ignore[attr-defined]
    return transform


def _load_file(path: Path, task_name: str | None) -> Callable[..., Any]:
    if not path.is_file():
        who = f" (task {task_name!r})" if task_name else ""
        raise FileNotFoundError(
            f"transform file {path.resolve()} not found{who}{nearby_hint(path)}: fix the 'transforms' path in the dataset config "
            f"(relative paths are resolved against the config file's directory), or use 'identity'/'chatml'"
        )
    safe = re.sub(r"\W", "_", task_name or path.stem)
    module_name = f"fm9g_live.transforms.{safe}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TransformError(f"cannot import transform file {path}: it must be a .py file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file failed while importing: name it
        raise TransformError(f"importing transform file {path} failed: {type(err).__name__}: {err}") from err
    sys.modules[module_name] = module
    fn = getattr(module, "transform", None)
    if fn is None or not callable(fn):
        raise TransformError(
            f"transform file {path} defines no function 'transform': add "
            f"`def transform(data, num_sample, r): return {{'input': ..., 'output': ...}}`"
        )
    try:
        inspect.signature(fn).bind(None, 0, None)
    except TypeError as err:
        raise TransformError(
            f"{path}: transform{inspect.signature(fn)} cannot be called as transform(data, num_sample, r): {err}"
        ) from err
    except ValueError:  # builtins without a signature: accept
        pass
    return fn


def load_transform(
    spec: str | Path | Callable[..., Any] | None,
    base_dir: str | Path | None = None,
    task_name: str | None = None,
) -> TransformFn:
    """Resolve a transform spec into a checked callable ``(data, num_sample, r) -> dict | None``.

    Args:
        spec: ``None`` / ``"identity"`` / ``"chatml"`` / ``"chatml-original"`` / ``"userai"``, a
            callable, or the path of a ``.py`` file that defines ``transform(data, num_sample, r)``.
        base_dir: directory that relative file paths are resolved against (the dataset-config
            file's directory); default: the current directory.
        task_name: used in error messages and the module name (``fm9g_live.transforms.<task_name>``).

    Returns:
        A callable returning a dict with string ``output`` and optional string ``input`` (or
        ``None`` to skip the record). Every return value is checked: a wrong shape raises
        :class:`TransformError` naming the file (or function) and the task.

    Raises:
        FileNotFoundError: the file does not exist.
        TransformError: the file fails to import, defines no ``transform``, or its signature
            cannot take ``(data, num_sample, r)``.
    """
    who = f" (task {task_name!r})" if task_name else ""
    if spec is None or (isinstance(spec, str) and spec in BUILTIN_TRANSFORMS):
        name = "identity" if spec is None else spec
        return _checked(BUILTIN_TRANSFORMS[name], f"built-in transform {name!r}{who}")
    if callable(spec):
        return _checked(spec, f"transform {getattr(spec, '__name__', spec)!r}{who}")
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.suffix != ".py" and not path.exists():
        raise TransformError(
            f"unknown transform {str(spec)!r}{who}: use one of {sorted(BUILTIN_TRANSFORMS)} or a path to a .py file"
        )
    fn = _load_file(path, task_name)
    return _checked(fn, f"transform file {path}{who}")
