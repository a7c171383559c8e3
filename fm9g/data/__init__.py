"""Data path: indexed datasets, transforms, chat templates, tokenization, packing and the weighted
mixture loader.

``fm9g.data.tokenize_record(record, tokenizer, chat_template=..., train_on=...)`` shows the input
ids and labels one record trains with (:func:`fm9g.data.chat.tokenize_record`).
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["tokenize_record", "check_chat_parity"]

_EXPORTS = {"tokenize_record": "fm9g.data.chat", "check_chat_parity": "fm9g.data.parity"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fm9g.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
