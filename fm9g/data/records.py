"""Record formats of a data line, and turning a chat record into a list of messages (docs/data.md).

One line of a source file (and of an index's ``data.jsonl``) is one JSON object in one of four
formats, detected per line from its keys or fixed for a whole build (``build_index(format=...)``):

``io`` — the original FM9G record
    ``{"input": "...", "output": "..."}`` (``input`` optional); as a chat:
    ``[user: input, assistant: output]``.
``messages`` — OpenAI style
    ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...],
    "tools": [...]}``; other keys of a message (``tool_calls``, ``name``, ``reasoning_content``)
    are passed to the chat template as they are.
``sharegpt``
    ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value": "..."}, ...],
    "system": "...", "tools": ...}``; ``from`` is mapped to a role by :data:`SHAREGPT_ROLES`.
``alpaca``
    ``{"instruction": "...", "input": "...", "output": "...", "system": "...",
    "history": [[question, answer], ...]}``; the user turn is the instruction, followed by a blank
    line and the input when there is one.

Detection order: ``messages``, then ``conversations``, then ``instruction``, else ``io``.
"""
from __future__ import annotations

import json
from typing import Any

__all__ = ["FORMATS", "ROLES", "SHAREGPT_ROLES", "RecordError", "detect_format", "record_problem", "to_chat",
           "is_chat_record"]

#: values of ``build_index(format=...)``; ``"auto"`` detects each line's format from its keys
FORMATS = ("auto", "io", "messages", "sharegpt", "alpaca")
#: roles a message may have
ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT ``from`` values and the role each stands for
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "model": "assistant", "chatgpt": "assistant", "function_call": "assistant", "tool": "tool",
    "function": "tool", "observation": "tool",
}
_CHAT_KEYS = ("messages", "conversations", "instruction")


class RecordError(ValueError):
    """A record cannot be read as a chat (no assistant turn, an unknown role, a wrong type)."""


def detect_format(record: dict) -> str:
    """The format of one record, from its keys: ``"messages"``, ``"sharegpt"``, ``"alpaca"`` or ``"io"``."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    return "io"


def is_chat_record(record: Any) -> bool:
    """Whether `record` is a dict in one of the chat formats (not the original ``io``)."""
    return isinstance(record, dict) and any(k in record for k in _CHAT_KEYS)


def _str_field(obj: dict, key: str, where: str, *, optional: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        got = "missing" if key not in obj else f"a {type(value).__name__}"
        return f"{where}field {key!r} must be a string, got {got}"
    return None


def _messages_problem(msgs: Any, role_key: str, content_key: str, roles: dict[str, str] | None) -> str:
    name = "conversations" if roles else "messages"
    if not isinstance(msgs, list) or not msgs:
        return f"field {name!r} must be a non-empty list of {{{role_key!r}, {content_key!r}}} objects"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"{name}[{i}] must be an object, got {type(m).__name__}"
        role = m.get(role_key)
        known = roles if roles is not None else {r: r for r in ROLES}
        if role not in known:
            return (f"{name}[{i}] has unknown {role_key} {role!r}: use one of {sorted(known)} "
                    "(or fix the record / write a transform that maps it)")
        content = m.get(content_key)
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            return f"{name}[{i}] field {content_key!r} must be a string, got {type(content).__name__}"
    if not any(known[m[role_key]] == "assistant" for m in msgs):
        return f"the dialogue in {name!r} has no assistant turn: nothing to train on (add one or drop the line)"
    return ""


def record_problem(record: Any, fmt: str = "auto") -> str:
    """Why `record` cannot be used in format `fmt` (``""`` when it can).

    Args:
        record: the parsed JSON line.
        fmt: one of :data:`FORMATS`.

    Returns:
        A one-line description of the first problem, or ``""``.
    """
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "messages":
        return _messages_problem(record.get("messages"), "role", "content", None)
    if fmt == "sharegpt":
        return _messages_problem(record.get("conversations"), "from", "value", SHAREGPT_ROLES)
    if fmt == "alpaca":
        for key, optional in (("instruction", False), ("output", False), ("input", True), ("system", True)):
            problem = _str_field(record, key, "", optional=optional)
            if problem:
                return problem
        history = record.get("history") or []
        if not isinstance(history, list) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
            return "field 'history' must be a list of [question, answer] string pairs"
        return ""
    if "output" not in record:
        return (f"missing field 'output' (keys: {sorted(record)[:10]}; a chat record needs 'messages', "
                "'conversations' or 'instruction')")
    return _str_field(record, "output", "") or _str_field(record, "input", "", optional=True) or ""


def _tools(record: dict) -> list | None:
    tools = record.get("tools")
    if isinstance(tools, str):  # ShareGPT files often carry the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except ValueError:
            return None
    return tools if isinstance(tools, list) and tools else None


def to_chat(record: dict, fmt: str = "auto") -> tuple[list[dict[str, Any]], list | None]:
    """The messages (and tools) of a record, in the OpenAI form the chat templates read.

    Args:
        record: a record of any format (validated with :func:`record_problem` first).
        fmt: its format, or ``"auto"`` to detect it.

    Returns:
        ``(messages, tools)``: ``messages`` a list of ``{"role", "content", ...}`` dicts; ``tools``
        the record's tool list or ``None``.

    Raises:
        RecordError: the record does not fit the format (the message of :func:`record_problem`).
    """
    problem = record_problem(record, fmt)
    if problem:
        raise RecordError(problem)
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "messages":
        return [dict(m) for m in record["messages"]], _tools(record)
    if fmt == "sharegpt":
        msgs = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
        msgs += [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in record["conversations"]]
        return msgs, _tools(record)
    if fmt == "alpaca":
        msgs = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        for question, answer in record.get("history") or []:
            msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}], None
    return [{"role": "user", "content": record.get("input") or ""},
            {"role": "assistant", "content": record["output"]}], None
