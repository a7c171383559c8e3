"""The original FM9G launcher's vocabulary, translated into :class:`~fm9g.training.config.TrainConfig` terms.

The one place that knows the original scripts' argument names and their bash-style values:

- key names: aliases (``dataset_config`` -> ``data``, ``load`` -> ``pretrained_model``, ...),
  hyphenated spellings (``train-iters``), the LoRA keys of the ``finetune`` section (``lora_r``,
  ``lora_alpha``, ``lora_dropout``, ``lora_layer``) and launcher keys without meaning here
  (:data:`IGNORED_KEYS`, accepted and dropped);
- the ``{"pretrain": {...}, "finetune": {...}}`` file layout (sections merged in that order);
- values written as strings (``"4096"``, ``"True"``, ``"1"`` / ``"0"``, ``"1e-4"``, ``"none"``),
  converted to the field's type by :func:`coerce`.

See docs/training.md ("Original train configs") for the rules.
"""
from __future__ import annotations

import difflib
import math
import os
import types
import typing
from typing import Any, Union

from fm9g._io import ConfigError, parse_bool

__all__ = ["ALIASES", "IGNORED_KEYS", "LORA_KEYS", "translate_keys", "merge_sections", "coerce", "lora_values"]

# original key (after '-' -> '_' normalisation) -> our field name
ALIASES: dict[str, str] = {
    "model_config": "model",
    "config": "model",
    "dataset_config": "data",
    "dataset": "data",
    "dataloader_num_workers": "num_workers",
    "tensorboard_all_tasks": "log_task_loss",
    "load": "pretrained_model",
    "log_dir": "stats_dir",
    "resume_no_optimze": "resume_no_optimizer",  # the original launcher's spelling
}

# keys of the original launcher that have no meaning here: accepted (so the original JSON files
# load unchanged) and ignored. value = why.
IGNORED_KEYS: dict[str, str] = {
    "n_gpus": "the GPU count comes from torchrun (--nproc_per_node)",
    "flash": "the attention backend is chosen by attn_impl",
    "local": "launcher switch",
    "dataloader": "only the indexed loader exists",
    "load_grad": "optimizer state is restored on resume (resume_no_optimizer=true skips it)",
    "grad_ckpt_num": "unused in the original",
    "only_run_dataloader": "unused in the original",
    "eps": "layer-norm eps comes from the model config; Adam eps is adam_eps",
    "strict_state_dict": "state dicts are always loaded strictly",
    "tp_size": "tensor parallelism is not supported",
    "async_save": "saves are synchronous and atomic",
    "dataloader_num_threads": "use num_workers",
    "dataloader_prefetch": "use num_workers",
    "dataloader_prefetch_factor": "use num_workers",
    "parallel_load_datastate": "loader state is one file",
    "delta_tuning": "LoRA is on when lora_r > 0 (or `lora` is set)",
    "save_name": "checkpoint files are always named fm9g_live_checkpoint-<step>.pt",
    "save_model": "unused in the original",
    "flash_attn_mask_shape": "unused",
}

# LoRA keys of the original finetune section -> LoraConfig field
LORA_KEYS: dict[str, str] = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                             "lora_layer": "target_modules"}

def translate_keys(d: dict[str, Any], field_names: set[str], source: str | None) -> dict[str, Any]:
    """Map original / hyphenated keys to TrainConfig field names.

    Args:
        d: the raw key -> value mapping (a JSON object or ``--set`` pairs).
        field_names: TrainConfig's field names.
        source: file name for error messages.
    Returns:
        field -> value; LoRA keys collected under ``"lora"`` (a dict of LoraConfig field names,
        on top of a ``lora`` value given in `d`); ignored keys dropped.
    Raises:
        ConfigError: an unknown key, with the nearest valid key.
    """
    out: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    where = f"{source}: " if source else ""
    for key, value in d.items():
        k = str(key).strip().replace("-", "_")
        if k in LORA_KEYS:
            lora[LORA_KEYS[k]] = value
            continue
        if k in IGNORED_KEYS:
            continue
        k = ALIASES.get(k, k)
        if k not in field_names:
            known = sorted(field_names | set(ALIASES) | set(LORA_KEYS) | set(IGNORED_KEYS))
            near = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(field_names))}"
            raise ConfigError(f"{where}unknown key {key!r}{hint}")
        out[k] = value
    if lora:
        base = lora_values(out.get("lora")) or {}
        base.update(lora)
        out["lora"] = base
    return out


def merge_sections(raw: dict[str, Any], source: str, section: str | None = None) -> dict[str, Any]:
    """The original ``{"pretrain": {...}, "finetune": {...}}`` layout as one flat dict (finetune
    overrides pretrain, as the original LoRA launcher did); a flat dict is returned unchanged.

    Args:
        raw: the parsed JSON object.
        source: file name for error messages.
        section: read only this section.
    Raises:
        ConfigError: keys beside the sections, a missing section, or a section that is not an object.
    """
    sections = [k for k in ("pretrain", "finetune") if k in raw]
    if not sections:
        return raw
    other = [k for k in raw if k not in ("pretrain", "finetune")]
    if other:
        raise ConfigError(f"{source}: keys {other} next to the 'pretrain'/'finetune' sections; move them into a section")
    merged: dict[str, Any] = {}
    for s in sections if section is None else [section]:
        if s not in raw:
            raise ConfigError(f"{source}: no section {s!r} (has {sections})")
        if not isinstance(raw[s], dict):
            raise ConfigError(f"{source}: section {s!r} must be an object")
        merged.update(raw[s])
    return merged


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (possibly a string from a shell-style config) to type ``tp``.

    Args:
        name: the field (for the error message).
        value: the given value (``"4096"``, ``"True"``, ``"1"``, ``"none"``, ``"(0.9, 0.95)"``, ...).
        tp: the field's type hint (``int``, ``float``, ``bool``, ``str``, a tuple of floats or a union of them).
    Raises:
        ConfigError: the value cannot be read as ``tp``.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        # for `str | None` fields a number is fine as a string (resume_ckpt=5)
        last_err: Exception | None = None
        for a in args:
            try:
                return coerce(name, value, a)
            except ConfigError as err:
                last_err = err
        raise last_err or ConfigError(f"{name}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list of numbers, got {value!r}")
        return tuple(coerce(name, v, float) for v in value)
    if tp is bool:
        return parse_bool(value, name)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, os.PathLike)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def lora_values(lora: Any) -> dict[str, Any] | None:
    """A ``lora`` value (None, a dict, or a LoraConfig) as a dict of LoraConfig fields, with the
    bash-style numbers of the original (``"64"``, ``"0.0"``) converted and the ``layers`` alias
    renamed; None for None.

    Raises:
        ConfigError: not a dict, a LoraConfig or None.
    """
    if lora is None:
        return None
    if hasattr(lora, "to_dict"):
        return dict(lora.to_dict())
    if not isinstance(lora, dict):
        raise ConfigError(f"lora must be a LoraConfig, a dict or null, got {lora!r}")
    d = {("target_modules" if k == "layers" else k): v for k, v in lora.items()}
    for key, tp in (("r", int), ("alpha", float), ("dropout", float)):
        if key in d and isinstance(d[key], str):  # named as the original finetune section spells it
            d[key] = coerce(f"lora_{key}", d[key], tp)
    if "r" in d and isinstance(d["r"], float) and d["r"] == int(d["r"]):
        d["r"] = int(d["r"])
    return d
