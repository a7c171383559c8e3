"""Dataset entries: the schema of one entry of a dataset config (the original
``dataset_configs/*.json`` list) and reading such a list. What the numbers mean for mixing is in
:mod:`fm9g.data.mixture` and docs/mixture.md.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from fm9g._io import ConfigError, parse_bool, read_json
from fm9g.data.chat import BUILTIN_TEMPLATES, TRAIN_ON
from fm9g.data.tokenize import BOS_POLICIES, OVERSIZE_RULES
from fm9g.data.transforms import BUILTIN_TRANSFORMS

__all__ = ["DatasetEntry", "MixtureConfigError", "load_dataset_config"]

#: A dataset config or loader setting is invalid (the one config error of fm9g, under the name
#: the mixture tests and docs use).
MixtureConfigError = ConfigError

_KEY_ALIASES = {"avg_tokens": "ave_tokens_per_line", "ave_tokens": "ave_tokens_per_line"}
_REQUIRED = ("dataset_name", "task_name", "path")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(kw_only=True)
class DatasetEntry:
    """One entry of a dataset config (the keys of the original ``dataset_configs/*.json``).

    Attributes:
        dataset_name: a name for humans (logs).
        task_name: unique id of the entry; batches carry it via ``task_ids`` / ``task_names``.
        path: index directory written by :func:`fm9g.data.indexed.build_index`.
        abs_weight: share of tokens (see :mod:`fm9g.data.mixture`); > 0. Either every entry has one
            or none has.
        transforms: ``None``/``"identity"``, ``"chatml"``, ``"chatml-original"``, ``"userai"``,
            a callable, or a path to a ``.py`` defining ``transform(data, num_sample, r)``.
        allow_repeat: start a new shuffled epoch when used up (else drop out).
        nlines: informational (the index's real line count is used).
        ave_tokens_per_line: initial guess of tokens per sample (aliases ``avg_tokens``,
            ``ave_tokens``); only seeds the running average.
        total_tokens: informational (billions of tokens).
        oversize_rule: ``"segment"``, ``"head"`` or ``"drop"`` (honoured, unlike the original).
        weight: sample-share weight, used (times the line count) only when no entry has ``abs_weight``.
        incontext_weight: weights of drawing ``num_sample = 0, 1, 2, ...`` for the transform.
        do_compact: cut the middle of over-long prompts (see :class:`SampleTokenizer`).
        is_long: informational (the original disabled PoSE for it).
        chat_template: render records through a chat template: ``"tokenizer"`` (the tokenizer's
            own), ``"chatml"`` / ``"chatml-original"`` / ``"userai"``, or a ``.jinja`` path.
            ``None`` (default): ``{input, output}`` records are tokenized as they are and chat
            records (messages, ShareGPT, Alpaca) use ``"tokenizer"`` (docs/data.md).
        train_on: chat records: ``"assistant"`` (every assistant turn), ``"last_assistant"`` or ``"all"``.
        bos: ``"auto"`` (BOS only where the tokenizer, or the chat template, puts one), ``"always"``
            or ``"never"``.
    """

    dataset_name: str
    task_name: str
    path: str
    abs_weight: float | None = None
    transforms: str | Callable[..., Any] | None = None
    allow_repeat: bool = True
    nlines: int | None = None
    ave_tokens_per_line: float | None = None
    total_tokens: float | None = None
    oversize_rule: str = "segment"
    weight: float = 1.0
    incontext_weight: list[float] = field(default_factory=lambda: [1.0])
    do_compact: bool = False
    is_long: bool = False
    chat_template: str | None = None
    train_on: str = "assistant"
    bos: str = "auto"

    @classmethod
    def keys(cls) -> list[str]:
        """The accepted keys (aliases ``avg_tokens`` / ``ave_tokens`` not included)."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, base_dir: str | Path | None = None, where: str = "dataset entry"
    ) -> "DatasetEntry":
        """Build and validate an entry from one JSON object.

        Args:
            data: the JSON object (original keys; aliases accepted).
            base_dir: directory that relative ``path`` / ``transforms`` are resolved against
                (the dataset-config file's directory); default: the current directory.
            where: how to name this entry in error messages (e.g. ``"entry 2 of mix.json"``).

        Raises:
            MixtureConfigError: unknown key, missing required key, or an invalid value.
        """
        if not isinstance(data, dict):
            raise MixtureConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        name = data.get("task_name")
        label = f"{where} (task_name {name!r})" if name is not None else where
        kwargs: dict[str, Any] = {}
        allowed = set(cls.keys())
        for key, value in data.items():
            canon = _KEY_ALIASES.get(key, key)
            if canon not in allowed:
                raise MixtureConfigError(
                    f"{label}: unknown key {key!r}; allowed keys: {sorted(allowed | set(_KEY_ALIASES))}"
                )
            if canon in kwargs:
                raise MixtureConfigError(f"{label}: {key!r} repeats {canon!r} (give only one of them)")
            kwargs[canon] = value
        missing = [k for k in _REQUIRED if k not in kwargs]
        if missing:
            raise MixtureConfigError(f"{label}: missing required key(s) {missing}")
        base = Path(base_dir) if base_dir is not None else None
        if isinstance(kwargs["path"], str) and base is not None and not Path(kwargs["path"]).expanduser().is_absolute():
            kwargs["path"] = str(base / kwargs["path"])
        tr = kwargs.get("transforms")
        if isinstance(tr, str) and tr not in BUILTIN_TRANSFORMS and base is not None:
            if not Path(tr).expanduser().is_absolute():
                kwargs["transforms"] = str(base / tr)
        ct = kwargs.get("chat_template")
        if isinstance(ct, str) and ct != "tokenizer" and ct not in BUILTIN_TEMPLATES and base is not None:
            if not Path(ct).expanduser().is_absolute():
                kwargs["chat_template"] = str(base / ct)
        entry = cls(**kwargs)
        entry.validate(where=label)
        return entry

    def to_dict(self) -> dict[str, Any]:
        """The entry as a JSON-able dict (a callable ``transforms`` is written as its name)."""
        d = asdict(self)
        if callable(self.transforms):
            d["transforms"] = getattr(self.transforms, "__name__", repr(self.transforms))
        return d

    def validate(self, *, where: str = "dataset entry") -> None:
        """Check types and values (not the files); raise :class:`MixtureConfigError` naming the key."""

        def bad(key: str, why: str) -> MixtureConfigError:
            return MixtureConfigError(f"{where}: {key!r} {why} (got {getattr(self, key)!r})")

        for key in ("dataset_name", "task_name", "path"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v:
                raise bad(key, "must be a non-empty string")
        for key in ("abs_weight", "weight"):
            v = getattr(self, key)
            if v is None and key == "abs_weight":
                continue
            if not _is_number(v):
                raise bad(key, "must be a number")
            if not math.isfinite(v) or v <= 0:
                raise bad(key, "must be a finite number > 0 (drop the entry to give a dataset no weight)")
        for key in ("allow_repeat", "do_compact", "is_long"):
            try:  # the one boolean parser of fm9g configs: true/false, 1/0, "true"/"false", "1"/"0"
                setattr(self, key, parse_bool(getattr(self, key), key))
            except ConfigError:
                raise bad(key, "must be true or false") from None
        if self.ave_tokens_per_line is not None and (
            not _is_number(self.ave_tokens_per_line) or not self.ave_tokens_per_line > 0
        ):
            raise bad("ave_tokens_per_line", "must be a number > 0")
        if self.nlines is not None and (not _is_number(self.nlines) or self.nlines < 0):
            raise bad("nlines", "must be a number >= 0")
        if self.total_tokens is not None and (not _is_number(self.total_tokens) or self.total_tokens < 0):
            raise bad("total_tokens", "must be a number >= 0")
        if self.oversize_rule not in OVERSIZE_RULES:
            raise bad("oversize_rule", f"must be one of {list(OVERSIZE_RULES)}")
        iw = self.incontext_weight
        if (
            not isinstance(iw, (list, tuple))
            or not iw
            or not all(_is_number(x) and math.isfinite(x) and x >= 0 for x in iw)
            or not sum(iw) > 0
        ):
            raise bad("incontext_weight", "must be a non-empty list of numbers >= 0 with a positive sum")
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template):
            raise bad("chat_template", "must be 'tokenizer', a built-in template name or a path to a .jinja file")
        if self.train_on not in TRAIN_ON:
            raise bad("train_on", f"must be one of {list(TRAIN_ON)}")
        if self.bos not in BOS_POLICIES:
            raise bad("bos", f"must be one of {list(BOS_POLICIES)}")
        if self.transforms is not None and not isinstance(self.transforms, str) and not callable(self.transforms):
            raise bad("transforms", "must be a built-in name, a path to a .py file, or a callable")


def load_dataset_config(
    source: str | Path | Sequence[dict[str, Any] | DatasetEntry], *, base_dir: str | Path | None = None
) -> list[DatasetEntry]:
    """Read a dataset config: a JSON file (the original format, unchanged) or a list of entries.

    Args:
        source: path of the JSON list, or a Python list of dicts / :class:`DatasetEntry`.
        base_dir: for a list of dicts, the directory relative paths are resolved against
            (default: the current directory). For a file, its own directory is used.

    Returns:
        The validated entries, in file order.

    Raises:
        MixtureConfigError: unreadable / invalid JSON (with line and column), not a list, an
            invalid entry, duplicate ``task_name``, or ``abs_weight`` on some entries only.
        FileNotFoundError: the JSON file does not exist.
    """
    if isinstance(source, (str, Path)):
        cfg_path = Path(source).expanduser()
        if not cfg_path.is_file():
            raise FileNotFoundError(f"dataset config {cfg_path} not found")
        raw = read_json(cfg_path, expect=list, error=MixtureConfigError)
        items: Sequence[Any] = raw
        base: Path | None = cfg_path.resolve().parent
        src_name = str(cfg_path)
    else:
        if not isinstance(source, (list, tuple)):
            raise MixtureConfigError(f"dataset config must be a path or a list, got {type(source).__name__}")
        items, base, src_name = source, (Path(base_dir) if base_dir is not None else None), "the dataset list"
    if not items:
        raise MixtureConfigError(f"{src_name}: the dataset config is empty")
    entries: list[DatasetEntry] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"entry {i} of {src_name}"
        if isinstance(item, DatasetEntry):
            entry = copy.copy(item)
            entry.validate(where=f"{where} (task_name {entry.task_name!r})")
        else:
            entry = DatasetEntry.from_dict(item, base_dir=base, where=where)
        if entry.task_name in seen:
            raise MixtureConfigError(
                f"{src_name}: duplicate task_name {entry.task_name!r} in entries {seen[entry.task_name]} and {i}; "
                f"task names must be unique"
            )
        seen[entry.task_name] = i
        entries.append(entry)
    has_abs = [e.abs_weight is not None for e in entries]
    if any(has_abs) and not all(has_abs):
        missing = [e.task_name for e in entries if e.abs_weight is None]
        raise MixtureConfigError(
            f"{src_name}: 'abs_weight' is set on some entries but missing on {missing}; give every entry an "
            f"abs_weight (token shares) or none (then weight x nlines are sample shares)"
        )
    if all(has_abs):
        check_shares([float(e.abs_weight) for e in entries], "abs_weight", src_name)  # type: ignore[arg-type]
    return entries


#: The smallest share of the total a weight may have (a smaller one would never be drawn, and its
#: normalised value would underflow the mixer's arithmetic).
MIN_SHARE = 1e-100


def check_shares(values: list[float], key: str, where: str) -> None:
    """Raise :class:`MixtureConfigError` unless ``values / sum(values)`` are finite shares >= MIN_SHARE."""
    total = sum(values)
    if not math.isfinite(total) or min(values) / total < MIN_SHARE:
        raise MixtureConfigError(
            f"{where}: the {key} values {values} cannot be normalised (their sum overflows, or a share is below "
            f"{MIN_SHARE:g} of the sum); only their ratios matter: give numbers such as 0.7 and 0.3"
        )
