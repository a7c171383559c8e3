"""fm9g: the Python SDK for training FM9G (九格) language models.

Public entry points are importable from the package root::

    from fm9g import FM9GConfig, FM9GModel, LoraConfig, build_index, IndexedDataset, \
        MixtureLoader, TrainConfig, Trainer, hf_to_bmt, bmt_to_hf

Names are resolved lazily so that ``import fm9g`` is cheap and never needs a GPU,
bmtrain or flash-attn.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "FM9GConfig": "fm9g.models.config",
    "FM9GModel": "fm9g.models.fm9g",
    "FM9GOutput": "fm9g.models.fm9g",
    "LoraConfig": "fm9g.convert.peft",  # defined in fm9g.models.lora; fm9g.convert.peft adds the HF target names
    "apply_lora": "fm9g.models.lora",
    "merge_lora": "fm9g.models.lora",
    "unmerge_lora": "fm9g.models.lora",
    "lora_state_dict": "fm9g.models.lora",
    "load_lora_state_dict": "fm9g.models.lora",
    "unload_lora": "fm9g.models.lora",
    "trainable_parameters": "fm9g.models.lora",
    "save_peft_adapter": "fm9g.convert.peft",
    "load_peft_adapter": "fm9g.convert.peft",
    "build_index": "fm9g.data.indexed",
    "IndexedDataset": "fm9g.data.indexed",
    "SampleTokenizer": "fm9g.data.tokenize",
    "MixtureLoader": "fm9g.data.mixture",
    "DatasetEntry": "fm9g.data.mixture",
    "TrainConfig": "fm9g.training.config",
    "Trainer": "fm9g.training.trainer",
    "hf_to_bmt": "fm9g.convert.hf",
    "bmt_to_hf": "fm9g.convert.hf",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fm9g' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from fm9g.convert.hf import bmt_to_hf, hf_to_bmt
    from fm9g.data.indexed import IndexedDataset, build_index
    from fm9g.data.mixture import DatasetEntry, MixtureLoader
    from fm9g.data.tokenize import SampleTokenizer
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel, FM9GOutput
    from fm9g.convert.peft import load_peft_adapter, save_peft_adapter
    from fm9g.models.lora import (LoraConfig, apply_lora, load_lora_state_dict, lora_state_dict, merge_lora,
                                  trainable_parameters, unload_lora, unmerge_lora)
    from fm9g.training.config import TrainConfig
    from fm9g.training.trainer import Trainer
