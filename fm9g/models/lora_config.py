"""`LoraConfig`: the LoRA hyper-parameters, the original runs' presets and the original
``"finetune"`` keys (docs/lora.md). Imports only the standard library and `fm9g._io`; the layers
and model operations are in `fm9g.models.lora`, which re-exports everything here.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fm9g._io import atomic_write_bytes, read_json

__all__ = ["ORIGINAL_TARGETS", "HF_TARGET_NAMES", "TARGET_ALIASES", "register_target_aliases", "LoraError", "LoraConfig"]

#: The linear layers of an FM9G block, in block order (original bmtrain names).
ORIGINAL_TARGETS: tuple[str, ...] = (
    "project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out",
)
#: The Hugging Face (Llama / Qwen2) names of the targets, as PEFT's ``target_modules`` spell them:
#: the leaf pairs of the name table `fm9g.convert.keys.NAME_TABLE` (tests/test_lora.py checks they agree).
HF_TARGET_NAMES: dict[str, str] = {
    "q_proj": "project_q", "k_proj": "project_k", "v_proj": "project_v", "o_proj": "attention_out",
    "gate_proj": "w_0", "up_proj": "w_1", "down_proj": "w_out",
}
#: Other names of the targets, mapped to the original ones by `LoraConfig`: the Hugging Face names,
#: and whatever `register_target_aliases` adds.
TARGET_ALIASES: dict[str, str] = dict(HF_TARGET_NAMES)


def register_target_aliases(aliases: Mapping[str, str]) -> None:
    """Accept ``aliases`` (other name -> one of `ORIGINAL_TARGETS`) in ``target_modules``."""
    unknown = sorted(set(aliases.values()) - set(ORIGINAL_TARGETS))
    if unknown:
        raise LoraError(f"target aliases must map to {list(ORIGINAL_TARGETS)}, got {unknown}")
    TARGET_ALIASES.update(aliases)


class LoraError(ValueError):
    """A LoRA config, target list or checkpoint that does not fit the model."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

# Effective settings of the original LoRA runs (docs/lora.md: train_configs/<size>_lora.json
# "finetune" sections override the run_bmtrain_lora.sh defaults).
_PRESETS: dict[str, dict[str, Any]] = {
    "fm9g-4b": dict(r=16, alpha=32, dropout=0.0, target_modules=list(ORIGINAL_TARGETS)),
    "fm9g-7b": dict(r=64, alpha=32, dropout=0.0, target_modules=list(ORIGINAL_TARGETS)),
    "fm9g-70b": dict(r=16, alpha=32, dropout=0.0, target_modules=["project_q", "project_v"]),
    # run_bmtrain_lora.sh / README defaults, before the *_lora.json override.
    "original-default": dict(
        r=16, alpha=32, dropout=0.0,
        target_modules=["project_q", "project_k", "project_v", "w_0", "w_1", "w_out"],
    ),
}
_PRESET_ALIASES = {"4b": "fm9g-4b", "7b": "fm9g-7b", "70b": "fm9g-70b", "default": "original-default"}
_ORIGINAL_KEYS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_layer": "target_modules"}


def _parse_target_list(value: Any, *, source: str = "target_modules") -> list[str]:
    """Turn a target list given as a list, a python-literal string or a comma list into names."""
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = ast.literal_eval(text)  # "['project_q','project_v']" as in the original JSONs
        except (ValueError, SyntaxError):
            if not re.fullmatch(r"[\w.,\s]+", text):
                raise LoraError(
                    f"{source}={value!r} is neither a list of module names nor a python-literal list "
                    "such as \"['project_q', 'project_v']\""
                ) from None
            parsed = [t for t in (p.strip() for p in text.split(",")) if t]
        value = [parsed] if isinstance(parsed, str) else parsed
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(t, str) for t in value):
        raise LoraError(f"{source} must be a list of module names, got {value!r}")
    return list(value)


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA hyper-parameters.

    Args:
        r: rank of the update (> 0).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability applied to the LoRA branch input (0 ≤ p < 1).
        target_modules: linear layers to wrap, matched against the end of module names (a name
            matches ``X`` if it equals ``X`` or ends with ``.X``). Original names
            (``project_q``, ``project_k``, ``project_v``, ``attention_out``, ``w_0``, ``w_1``,
            ``w_out``) or an alias (`TARGET_ALIASES`: the Hugging Face names ``q_proj`` ...
            ``down_proj``), mapped to the original ones. Duplicates are dropped, order kept.

    Example::

        LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]).target_modules
        # -> ['project_q', 'project_v']
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["project_q", "project_k", "project_v", "w_0", "w_1", "w_out"]
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise LoraError(f"LoraConfig.alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise LoraError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        names = _parse_target_list(self.target_modules)
        if not names:
            raise LoraError("LoraConfig.target_modules is empty: name at least one linear layer, e.g. ['project_q', 'project_v']")
        mapped: list[str] = []
        for name in names:
            name = name.strip()
            if not name:
                raise LoraError(f"LoraConfig.target_modules contains an empty name: {names!r}")
            name = TARGET_ALIASES.get(name, name)
            if name not in mapped:
                mapped.append(name)
        self.target_modules = mapped

    @property
    def scaling(self) -> float:
        """The factor ``alpha / r`` applied to the LoRA update."""
        return float(self.alpha) / self.r

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by :meth:`from_name`."""
        return sorted(_PRESETS)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LoraConfig":
        """A preset matching the original runs' effective settings (docs/lora.md).

        ``fm9g-7b``: r 64, α 32, all 7 projections; ``fm9g-4b``: r 16, α 32, all 7;
        ``fm9g-70b``: r 16, α 32, ``project_q``/``project_v`` only; ``original-default``: the
        README defaults (r 16, α 32, no ``attention_out``). Dropout is 0 in all of them.

        Args:
            name: preset name (``7b``/``4b``/``70b`` accepted too).
            **overrides: fields to change, e.g. ``dropout=0.05``.
        """
        key = _PRESET_ALIASES.get(name.lower(), name.lower())
        if key not in _PRESETS:
            raise LoraError(f"unknown LoRA preset {name!r}; choose one of {cls.presets()}")
        values = {**_PRESETS[key], **overrides}
        values["target_modules"] = list(values["target_modules"])
        return cls(**values)

    # -- dict / JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the fields (``r``, ``alpha``, ``dropout``, ``target_modules``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "LoRA config",
                  require: tuple[str, ...] = ()) -> "LoraConfig":
        """Build from our keys or from the original ``"finetune"`` keys.

        Accepts ``{"r", "alpha", "dropout", "target_modules"}`` (unknown keys are an error), or the
        original ``{"lora_r", "lora_alpha", "lora_dropout", "lora_layer"}`` (other keys of the
        original ``finetune`` section, such as ``lr``, are ignored). A dict with a ``"finetune"``
        (or ``"lora"``) section is read from that section. ``lora_layer`` may be a list or the
        python-literal string used by the original scripts (``"['project_q','project_v']"``).
        ``require`` names fields that must be given (in either spelling) rather than defaulted.
        """
        if not isinstance(data, Mapping):
            raise LoraError(f"{source}: expected a JSON object, got {type(data).__name__}")
        for section in ("finetune", "lora"):
            if isinstance(data.get(section), Mapping):
                return cls.from_dict(data[section], source=f"{source} [{section!r}]", require=require)
        original = [k for k in data if k in _ORIGINAL_KEYS]
        ours = [k for k in data if k in {f.name for f in dataclasses.fields(cls)}]
        if original:
            clash = [k for k in original if _ORIGINAL_KEYS[k] in data]
            if clash:
                raise LoraError(f"{source}: both {clash} and {[_ORIGINAL_KEYS[k] for k in clash]} are set; keep one spelling")
            values = {_ORIGINAL_KEYS[k]: data[k] for k in original}
            values.update({k: data[k] for k in ours})
        else:
            unknown = sorted(set(data) - set(ours))
            if unknown:
                raise LoraError(
                    f"{source}: unknown keys {unknown}; expected r, alpha, dropout, target_modules "
                    "(or the original lora_r, lora_alpha, lora_dropout, lora_layer)"
                )
            values = dict(data)
        absent = [name for name in require if name not in values]
        if absent:
            raise LoraError(f"{source}: does not give {absent}")
        if "target_modules" in values:
            values["target_modules"] = _parse_target_list(values["target_modules"], source=f"{source}: target_modules")
        try:
            return cls(**values)
        except LoraError as e:
            raise LoraError(f"{source}: {e}") from None
        except TypeError as e:  # a wrong value type reaching the dataclass
            raise LoraError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "LoraConfig":
        """Read a JSON file written by :meth:`to_json` or an original ``train_configs/*_lora.json``."""
        return cls.from_dict(read_json(path, error=LoraError), source=str(path))

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the config as JSON text; when ``path`` is given also write it there (atomically)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            atomic_write_bytes(path, text.encode("utf-8"))
        return text
