"""Where a run's model config comes from, without building anything.

``model`` (alias ``config``) is, in this order: an ``FM9GConfig``; a model JSON found by the path
rule (``model_configs/<name>.json`` for a bare name, see :meth:`TrainConfig.find_file`); a preset
name or its short alias (``"7b"`` for ``fm9g-7b``). When ``model`` is not set, the ``config.json``
that ``fm9g convert hf2bmt`` writes beside a ``.pt`` (or the one in a checkpoint folder) is used.
A name that is none of these is an error listing every absolute path tried.
"""
from __future__ import annotations

import os
from pathlib import Path

from fm9g._io import ConfigError, nearby_hint
from fm9g.convert.hf_config import load_model_config
from fm9g.models.config import FM9GConfig
from fm9g.training.config import TrainConfig

__all__ = ["model_config_of", "config_beside_weights", "lookup_paths"]


def lookup_paths(config: TrainConfig, name: str, folder: str = "model_configs") -> list[str]:
    """The absolute paths :meth:`TrainConfig.find_file` looks a ``model`` / ``data`` value up at
    (for messages)."""
    base = config.base_dir or os.getcwd()
    if os.path.isabs(os.path.expanduser(name)) or "/" in name or name.endswith(".json"):
        return [os.path.abspath(config.resolve_path(name))]
    return [os.path.join(base, folder, f"{name}.json"), os.path.join(base, folder, name)]


def config_beside_weights(config: TrainConfig) -> Path | None:
    """The ``config.json`` beside a ``pretrained_model`` ``.pt`` file, or inside a checkpoint folder
    holding a ``.pt`` (None when there is none, or ``pretrained_model`` is an HF directory)."""
    if not config.pretrained_model:
        return None
    pre = Path(config.resolve_path(config.pretrained_model))
    if pre.is_file() and pre.suffix == ".pt":
        beside = pre.parent / "config.json"
    elif pre.is_dir() and any(pre.glob("*.pt")):
        beside = pre / "config.json"
    else:
        return None
    return beside if beside.is_file() else None


def model_config_of(config: TrainConfig) -> FM9GConfig | None:
    """The model config the run names (see the module text); None when it names none.

    Raises:
        FileNotFoundError: ``model`` is neither a model JSON nor a preset (every path tried is named).
        ConfigError: the JSON found cannot be read as a model config.
    """
    m = config.model
    if isinstance(m, FM9GConfig):
        return m
    if m is None:
        beside = config_beside_weights(config)
        return load_model_config(beside) if beside is not None else None
    path = config.find_file(m, "model_configs")
    if path is not None and os.path.isfile(path):
        return load_model_config(path)  # an original model JSON or an HF config.json
    try:
        return FM9GConfig.from_name(m)
    except ConfigError as err:
        tried = lookup_paths(config, m)
        raise FileNotFoundError(
            f"model={m!r} is neither a model config JSON (tried {', '.join(tried)}) nor a preset ({err})"
            f"{nearby_hint(tried[0])}") from None
