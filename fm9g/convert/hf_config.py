"""Hugging Face ``config.json`` <-> `FM9GConfig`: one table, read in one direction by
`fm9g_config_from_hf` and written in the other by `hf_config_from_fm9g`, plus what the native
export changes (the muP factors folded into the weights, the head untied when that makes it
differ from the embedding). See docs/convert.md.

    cfg = load_hf_config("hf_ckpt_dir")                 # config.json + the weight names
    cfg = load_model_config("any/config.json")          # an original model JSON or an HF config.json
    hf = hf_config_from_fm9g(cfg, format="native")      # the config.json of an export
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fm9g._io import ConfigError
from fm9g.convert.files import ConversionError, check_hf_dir, hf_weight_names, read_conversion_json
from fm9g.models.config import FM9GConfig, dtype_name

__all__ = [
    "HFConfigError",
    "HFField",
    "HF_FIELDS",
    "MUP_FIELDS",
    "SUPPORTED_MODEL_TYPES",
    "fm9g_config_from_hf",
    "hf_config_from_fm9g",
    "load_hf_config",
    "load_model_config",
    "is_hf_config",
    "resolve_config",
    "native_unties",
    "export_factors",
]

PathLike = str | os.PathLike[str]

#: HF ``model_type`` values `hf_to_bmt` reads (MiniCPM means MiniCPM-1/2 style: Llama layout + muP).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "minicpm", "fm9g", "fm9g7b")

_REQUIRED = object()


class HFConfigError(ConversionError, ConfigError):
    """A Hugging Face config.json that does not map to an FM9GConfig (a conversion error and a
    config error both)."""


@dataclass(frozen=True)
class Same:
    """Default of a field: the value of another FM9GConfig field."""

    field: str


@dataclass(frozen=True)
class HFField:
    """One FM9GConfig field and its ``config.json`` key.

    Attributes:
        hf: the Hugging Face key.
        fm9g: the FM9GConfig field.
        cast: turns the JSON value into the field's value.
        default: the value when the key is absent or null (`Same`: another field's value);
            a required key has none.
    """

    hf: str
    fm9g: str
    cast: Callable[[Any], Any]
    default: Any = _REQUIRED


def _activation(name: Any) -> str:
    return "silu" if name in ("silu", "swish") else str(name)


#: The fields every Llama / Qwen2-layout config carries (written in both export formats).
HF_FIELDS: tuple[HFField, ...] = (
    HFField("vocab_size", "vocab_size", int),
    HFField("hidden_size", "dim_model", int),
    HFField("intermediate_size", "dim_ff", int),
    HFField("num_hidden_layers", "num_layers", int),
    HFField("num_attention_heads", "num_heads", int),
    HFField("num_key_value_heads", "num_kv_heads", int, Same("num_heads")),
    HFField("head_dim", "dim_head", int, None),  # None: FM9GConfig takes dim_model // num_heads
    HFField("hidden_act", "activate_fn", _activation, "silu"),
    HFField("max_position_embeddings", "max_length", int, 8192),
    HFField("initializer_range", "init_std", float, 0.02),
    HFField("rms_norm_eps", "eps", float, 1e-6),
    HFField("rope_theta", "base", float, 10000.0),
    HFField("tie_word_embeddings", "tie_lm_head", bool, True),  # transformers' PretrainedConfig default
)
#: muP fields: read from ``minicpm`` / ``fm9g`` configs, written by ``format="fm9g"``.
MUP_FIELDS: tuple[HFField, ...] = (
    HFField("scale_emb", "scale_emb", float, 1.0),
    HFField("scale_depth", "scale_depth", float, -1.0),
    HFField("dim_model_base", "dim_model_base", int, 256),
)
_FM9G_AUTO_MAP = {
    "AutoConfig": "configuration_fm9g.FM9GConfig",
    "AutoModel": "modeling_fm9g.FM9GModel",
    "AutoModelForCausalLM": "modeling_fm9g.FM9GForCausalLM",
}


def _read_fields(hf_config: Mapping[str, Any], rows: tuple[HFField, ...], source: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for row in rows:
        raw = hf_config.get(row.hf)
        if raw is not None:
            values[row.fm9g] = row.cast(raw)
        elif row.default is _REQUIRED:
            raise HFConfigError(f"{source}: has no {row.hf!r}; is it a Llama / Qwen2-layout config.json?")
        else:
            values[row.fm9g] = values[row.default.field] if isinstance(row.default, Same) else row.default
    return values


def _write_fields(config: FM9GConfig, rows: tuple[HFField, ...]) -> dict[str, Any]:
    return {row.hf: getattr(config, row.fm9g) for row in rows}


# ================================================================================================
# HF config.json -> FM9GConfig
# ================================================================================================


def _rope_theta(cfg: Mapping[str, Any]) -> float | None:
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping):
        if "rope_theta" in params:  # transformers >= 5 standardised form
            return float(params["rope_theta"])
        if params and all(isinstance(v, Mapping) for v in params.values()):  # per-layer-type form
            thetas = {float(v.get("rope_theta", 10000.0)) for v in params.values()}
            if len(thetas) == 1:
                return thetas.pop()
    return None


def _refuse_unsupported(hf_config: Mapping[str, Any], model_type: str, source: str) -> None:
    """Raise HFConfigError for an architecture or feature FM9G does not have."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConfigError(
            f"{source}: model_type {hf_config.get('model_type')!r} (architectures {hf_config.get('architectures')}) "
            f"is not supported; hf_to_bmt reads {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    if any(k in hf_config for k in ("q_lora_rank", "kv_lora_rank")):
        raise HFConfigError(
            f"{source}: multi-head latent attention (q_lora_rank / kv_lora_rank, MiniCPM3 style) is not "
            "supported; FM9G uses plain grouped-query attention"
        )
    act = str(hf_config.get("hidden_act", "silu"))
    if act not in ("silu", "swish"):
        raise HFConfigError(f"{source}: hidden_act {act!r} is not supported; FM9G uses a gated silu FFN")
    if hf_config.get("mlp_bias"):
        raise HFConfigError(f"{source}: mlp_bias=true is not supported; FM9G's FFN has no biases")
    if hf_config.get("use_sliding_window"):
        raise HFConfigError(f"{source}: use_sliding_window=true is not supported; FM9G attends over the full context")
    for key in ("rope_scaling", "rope_parameters"):
        value = hf_config.get(key)
        if not isinstance(value, Mapping):
            continue
        kinds = [value.get("rope_type", value.get("type"))]
        if all(isinstance(v, Mapping) for v in value.values()) and value:
            kinds = [v.get("rope_type", v.get("type")) for v in value.values()]
        for kind in kinds:
            if kind not in (None, "default"):
                raise HFConfigError(
                    f"{source}: {key} type {kind!r} is not supported (FM9G uses plain RoPE); "
                    "only checkpoints without RoPE scaling can be converted"
                )


def _qkv_bias(hf_config: Mapping[str, Any], model_type: str, tensor_names: set[str] | None, source: str) -> bool:
    """q/k/v biases: from the tensors when we have them (checked against the config), else the config."""
    if model_type == "qwen2":
        qkv_bias = True
    elif model_type == "llama":
        if hf_config.get("attention_bias"):
            raise HFConfigError(
                f"{source}: Llama attention_bias=true also puts a bias on o_proj, which FM9G does not have; "
                "only q/k/v biases are supported (Qwen2 layout)"
            )
        qkv_bias = False
    elif model_type == "fm9g7b":
        qkv_bias = bool(hf_config.get("attention_bias", True))
    else:
        qkv_bias = bool(hf_config.get("attention_bias", hf_config.get("qkv_bias", False)))
    if tensor_names is None:
        return qkv_bias
    has_bias = "model.layers.0.self_attn.q_proj.bias" in tensor_names
    if model_type in ("llama", "qwen2") and has_bias != qkv_bias:
        raise HFConfigError(
            f"{source}: model_type {model_type!r} {'expects' if qkv_bias else 'does not allow'} q/k/v biases, "
            f"but the weights {'lack' if qkv_bias else 'have'} model.layers.0.self_attn.q_proj.bias"
        )
    if "model.layers.0.self_attn.o_proj.bias" in tensor_names:
        raise HFConfigError(f"{source}: the weights have o_proj biases, which FM9G does not support")
    return has_bias


def _mup(hf_config: Mapping[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """``scale`` and the muP fields (the FM9GConfig defaults for models without muP)."""
    given = all(hf_config.get(row.hf) is not None for row in MUP_FIELDS)
    if model_type == "minicpm" and not given:
        raise HFConfigError(f"{source}: a minicpm config needs scale_emb, scale_depth and dim_model_base")
    if model_type == "minicpm":
        scale = True
    elif model_type == "fm9g":
        scale = bool(hf_config["scale"]) if "scale" in hf_config else given
    else:
        scale = False
    values = _read_fields(hf_config if model_type in ("minicpm", "fm9g") else {}, MUP_FIELDS, source)
    return {"scale": scale, **values}


def fm9g_config_from_hf(
    hf_config: Mapping[str, Any],
    *,
    tensor_names: set[str] | None = None,
    source: str = "config.json",
) -> FM9GConfig:
    """Infer an `FM9GConfig` from a Hugging Face ``config.json`` dict.

    Supported ``model_type`` values: ``llama``, ``qwen2`` (q/k/v bias), ``minicpm`` (muP:
    ``scale_emb``, ``scale_depth``, ``dim_model_base`` → ``scale=True``), ``fm9g`` (muP when the
    fields are present, or as given by an explicit ``scale``) and ``fm9g7b`` (no muP).

    Args:
        hf_config: the parsed ``config.json``.
        tensor_names: HF weight names of the checkpoint; when given, ``qkv_bias`` is read from the
            presence of ``q_proj.bias`` (authoritative) and checked against the config.
        source: a name for error messages.

    Returns:
        The config.

    Raises:
        HFConfigError: an unsupported architecture (named, with the supported list) or feature.
    """
    model_type = str(hf_config.get("model_type", "")).lower()
    _refuse_unsupported(hf_config, model_type, source)
    values = _read_fields({**hf_config, "rope_theta": _rope_theta(hf_config)}, HF_FIELDS, source)
    values.update(_mup(hf_config, model_type, source))
    values["qkv_bias"] = _qkv_bias(hf_config, model_type, tensor_names, source)
    precision = hf_config.get("torch_dtype") or hf_config.get("dtype")
    if isinstance(precision, str) and dtype_name(precision) is not None:
        values["dtype"] = dtype_name(precision)
    try:
        return FM9GConfig(**values)
    except ValueError as err:
        raise HFConfigError(f"{source}: {err}") from None


def load_hf_config(hf_dir: PathLike) -> FM9GConfig:
    """Infer the `FM9GConfig` of a Hugging Face directory (``config.json`` + the weight names).

    Raises:
        FileNotFoundError: no such directory / no config.json.
        ConversionError: unsupported architecture or feature (named).
    """
    path = check_hf_dir(hf_dir)
    names = set(hf_weight_names(path))
    return fm9g_config_from_hf(read_conversion_json(path / "config.json"), tensor_names=names,
                               source=str(path / "config.json"))


def is_hf_config(data: Any) -> bool:
    """Whether a parsed JSON is a Hugging Face ``config.json`` (not an original model JSON)."""
    return isinstance(data, Mapping) and "model_type" in data and "hidden_size" in data


def load_model_config(path: PathLike) -> FM9GConfig:
    """An original / fm9g model JSON (`FM9GConfig.from_json`) or a Hugging Face ``config.json``
    (`fm9g_config_from_hf`), told apart by `is_hf_config`."""
    data = read_conversion_json(Path(path))
    if is_hf_config(data):
        return fm9g_config_from_hf(data, source=str(path))
    return FM9GConfig.from_json(path)


def resolve_config(
    config: FM9GConfig | Mapping[str, Any] | PathLike | None, ckpt: Path, reference_dir: Path | None
) -> FM9GConfig:
    """The model config of a conversion: `config` (an FM9GConfig, a dict of its fields or a JSON
    path), else ``config.json`` beside `ckpt`, else the config of `reference_dir`."""
    if isinstance(config, FM9GConfig):
        return config
    if isinstance(config, Mapping):
        return FM9GConfig.from_dict(dict(config), source="config")
    if config is not None:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config file {config} does not exist")
        return load_model_config(config)
    if (ckpt.parent / "config.json").is_file():
        return load_model_config(ckpt.parent / "config.json")
    if reference_dir is not None:
        return load_hf_config(reference_dir)
    raise ConversionError(
        f"no model config for {ckpt}: pass config= (an FM9GConfig or a model_configs JSON), put config.json "
        "beside the checkpoint, or pass reference_dir= (a Hugging Face directory of the same model)"
    )


# ================================================================================================
# FM9GConfig -> HF config.json, and what the native export changes
# ================================================================================================


def native_unties(config: FM9GConfig) -> bool:
    """A tied head must be written separately in a native export when muP makes it differ."""
    return config.tie_lm_head and config.scale and (config.scale_emb != 1.0 or config.scale_width != 1.0)


def export_factors(config: Any, format: str) -> dict[str, float]:
    """The factor each module's weight (and its LoRA update) is multiplied by in an export, keyed
    by the last name of the module; modules not listed keep theirs.

    ``format="native"`` folds muP into the weights: the embedding × scale_emb (when ``scale``),
    ``attention_out`` / ``w_out`` × scale_depth/√L, ``lm_head`` ÷ scale_width. ``format="fm9g"``
    keeps the weights as trained (no factors). `config` is an FM9GConfig, or any object with its
    muP fields (``scale``, ``scale_emb``, ``scale_width``, ``scale_depth``, ``num_layers``).
    """
    if format == "fm9g":
        return {}
    depth, layers = float(getattr(config, "scale_depth", -1.0) or -1.0), int(getattr(config, "num_layers", 0) or 0)
    residual = depth / math.sqrt(layers) if depth > 0 and layers > 0 else 1.0
    mup = bool(getattr(config, "scale", False))
    return {
        "input_embedding": float(getattr(config, "scale_emb", 1.0)) if mup else 1.0,
        "attention_out": residual,
        "w_out": residual,
        "lm_head": 1.0 / float(getattr(config, "scale_width", 1.0) or 1.0) if mup else 1.0,
    }


def hf_config_from_fm9g(
    config: FM9GConfig,
    *,
    format: str = "native",
    dtype: torch.dtype = torch.bfloat16,
    reference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` dict of an export.

    Args:
        config: the model config.
        format: ``"native"`` (Llama / Qwen2, muP folded, head untied when muP changes it) or
            ``"fm9g"`` (our remote code, muP fields kept).
        dtype: the weights' dtype (``torch_dtype``).
        reference: a reference ``config.json``: its token ids (bos / eos / pad) are kept.
    """
    out = _write_fields(config, HF_FIELDS)
    out.update(use_cache=True, attention_dropout=0.0)
    out["torch_dtype"] = str(dtype).removeprefix("torch.")  # the config key transformers 4.44 reads
    out.update({k: v for k, v in (reference or {}).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    if format == "fm9g":
        out.update(architectures=["FM9GForCausalLM"], model_type="fm9g", auto_map=dict(_FM9G_AUTO_MAP),
                   attention_bias=config.qkv_bias, scale=config.scale, **_write_fields(config, MUP_FIELDS))
    elif format == "native":
        out["tie_word_embeddings"] = config.tie_lm_head and not native_unties(config)
        if config.qkv_bias:
            # Qwen2 has q/k/v biases and none on o_proj: exactly FM9G-7B's attention.
            out.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                       use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
        else:
            out.update(architectures=["LlamaForCausalLM"], model_type="llama",
                       attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        raise ConversionError(f"format must be 'native' or 'fm9g', got {format!r}")
    return out
