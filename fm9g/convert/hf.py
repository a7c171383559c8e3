"""Read and write Hugging Face checkpoint directories: `hf_to_bmt`, `bmt_to_hf`, `load_pretrained`.

Both directions stream: tensors are memory-mapped (safetensors `safe_open`,
`torch.load(mmap=True, weights_only=True)`) and written one at a time, so converting a 7B model
never holds several copies of it in memory. Outputs go to a temporary file / directory next to the
destination and are renamed into place at the end: a failed conversion leaves nothing half-written.

Example::

    from fm9g import hf_to_bmt, bmt_to_hf

    cfg = hf_to_bmt("hf_ckpt_dir", "9g_models/7b.pt")        # writes 7b.pt + config.json beside it
    bmt_to_hf("9g_models/7b.pt", "hf_out", reference_dir="hf_ckpt_dir")          # Llama / Qwen2
    bmt_to_hf("9g_models/7b.pt", "hf_fm9g", reference_dir="hf_ckpt_dir", format="fm9g")

Formats written by `bmt_to_hf`:

* ``format="native"``: muP folded into the weights (embedding × scale_emb, o_proj / down_proj ×
  scale_depth/√L, lm_head ÷ scale_width, head untied when that makes it differ from the
  embedding), written as ``LlamaForCausalLM`` -- or ``Qwen2ForCausalLM`` when q/k/v carry biases.
  Stock transformers and vLLM load it with no remote code.
* ``format="fm9g"``: weights as trained (Llama names), ``config.json`` with ``model_type "fm9g"``,
  the muP fields and an ``auto_map`` to our own ``configuration_fm9g.py`` / ``modeling_fm9g.py``,
  which are copied into the directory (``trust_remote_code=True``).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fm9g._io import atomic_file, atomic_write_text, default_permissions, name_list, read_json
from fm9g.models.config import FM9GConfig

__all__ = [
    "ConversionError",
    "SUPPORTED_MODEL_TYPES",
    "load_hf_config",
    "fm9g_config_from_hf",
    "hf_config_from_fm9g",
    "expected_bmt_shapes",
    "read_hf_state_dict",
    "read_bmt_checkpoint",
    "hf_to_bmt",
    "bmt_to_hf",
    "load_pretrained",
    "save_safetensors_sharded",
]

PathLike = str | os.PathLike[str]

#: HF ``model_type`` values `hf_to_bmt` reads (MiniCPM means MiniCPM-1/2 style: Llama layout + muP).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "minicpm", "fm9g", "fm9g7b")

REMOTE_CODE_DIR = Path(__file__).with_name("remote")
REMOTE_FILES: tuple[str, ...] = ("configuration_fm9g.py", "modeling_fm9g.py")
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
_FOLD_BLOCK_ELEMENTS = 1 << 24  # 64 MB of fp32 per block when folding muP / merging LoRA

# reference_dir files copied into an export (never its weights, config or modeling code)
_REFERENCE_FILE_PATTERNS = (
    r"generation_config\.json",
    r"tokenizer.*",
    r"tokenization_.*\.py",
    r"special_tokens_map\.json",
    r"added_tokens\.json",
    r"vocab.*",
    r"merges\.txt",
    r"chat_template.*",
    r".*\.tiktoken",
    r"spiece\.model",
    r"preprocessor_config\.json",
)

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


class ConversionError(ValueError):
    """A checkpoint or directory that cannot be converted; the message says what to change."""


# ================================================================================================
# small helpers
# ================================================================================================


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ConversionError(f"dtype {dtype!r} is not known; use one of bf16, fp16, fp32")
    return _DTYPE_NAMES[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, error=ConversionError)


def _check_hf_dir(hf_dir: PathLike) -> Path:
    path = Path(hf_dir)
    if not path.exists():
        raise FileNotFoundError(f"Hugging Face directory {str(path)!r} does not exist; pass the folder holding config.json")
    if not path.is_dir():
        raise ConversionError(
            f"{path} is a file, not a Hugging Face directory; pass the folder holding config.json and the weights"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    return path


# ================================================================================================
# config inference: HF config.json <-> FM9GConfig
# ================================================================================================


def _rope_theta(cfg: Mapping[str, Any]) -> float:
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
    return 10000.0


def _check_rope_scaling(cfg: Mapping[str, Any], source: str) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if not isinstance(value, Mapping):
            continue
        kinds = [value.get("rope_type", value.get("type"))]
        if all(isinstance(v, Mapping) for v in value.values()) and value:
            kinds = [v.get("rope_type", v.get("type")) for v in value.values()]
        for kind in kinds:
            if kind not in (None, "default"):
                raise ConversionError(
                    f"{source}: {key} type {kind!r} is not supported (FM9G uses plain RoPE); "
                    "only checkpoints without RoPE scaling can be converted"
                )


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
        ConversionError: an unsupported architecture (named, with the supported list) or feature.
    """
    model_type = str(hf_config.get("model_type", "")).lower()
    arch = hf_config.get("architectures")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{source}: model_type {hf_config.get('model_type')!r} (architectures {arch}) is not supported; "
            f"hf_to_bmt reads {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    if any(k in hf_config for k in ("q_lora_rank", "kv_lora_rank")):
        raise ConversionError(
            f"{source}: multi-head latent attention (q_lora_rank / kv_lora_rank, MiniCPM3 style) is not "
            "supported; FM9G uses plain grouped-query attention"
        )
    act = str(hf_config.get("hidden_act", "silu"))
    if act not in ("silu", "swish"):
        raise ConversionError(f"{source}: hidden_act {act!r} is not supported; FM9G uses a gated silu FFN")
    if hf_config.get("mlp_bias"):
        raise ConversionError(f"{source}: mlp_bias=true is not supported; FM9G's FFN has no biases")
    if hf_config.get("use_sliding_window"):
        raise ConversionError(f"{source}: use_sliding_window=true is not supported; FM9G attends over the full context")
    _check_rope_scaling(hf_config, source)

    # q/k/v bias: from the tensors when we have them, else from the config
    if model_type == "qwen2":
        qkv_bias = True
    elif model_type == "llama":
        if hf_config.get("attention_bias"):
            raise ConversionError(
                f"{source}: Llama attention_bias=true also puts a bias on o_proj, which FM9G does not have; "
                "only q/k/v biases are supported (Qwen2 layout)"
            )
        qkv_bias = False
    elif model_type == "fm9g7b":
        qkv_bias = bool(hf_config.get("attention_bias", True))
    else:
        qkv_bias = bool(hf_config.get("attention_bias", hf_config.get("qkv_bias", False)))
    if tensor_names is not None:
        has_bias = "model.layers.0.self_attn.q_proj.bias" in tensor_names
        if model_type in ("llama", "qwen2") and has_bias != qkv_bias:
            raise ConversionError(
                f"{source}: model_type {model_type!r} {'expects' if qkv_bias else 'does not allow'} q/k/v biases, "
                f"but the weights {'lack' if qkv_bias else 'have'} model.layers.0.self_attn.q_proj.bias"
            )
        qkv_bias = has_bias
        if "model.layers.0.self_attn.o_proj.bias" in tensor_names:
            raise ConversionError(f"{source}: the weights have o_proj biases, which FM9G does not support")

    # muP
    mup_fields = all(hf_config.get(k) is not None for k in ("scale_emb", "scale_depth", "dim_model_base"))
    if model_type == "minicpm":
        if not mup_fields:
            raise ConversionError(f"{source}: a minicpm config needs scale_emb, scale_depth and dim_model_base")
        scale = True
    elif model_type == "fm9g":
        scale = bool(hf_config["scale"]) if "scale" in hf_config else mup_fields
    else:
        scale = False
    if model_type in ("minicpm", "fm9g"):
        scale_emb = float(hf_config.get("scale_emb", 1.0))
        scale_depth = float(hf_config.get("scale_depth", -1.0))
        dim_model_base = int(hf_config.get("dim_model_base", 256))
    else:
        scale_emb, scale_depth, dim_model_base = 1.0, -1.0, 256

    hidden = int(hf_config["hidden_size"])
    heads = int(hf_config["num_attention_heads"])
    head_dim = hf_config.get("head_dim") or hidden // heads
    tie = hf_config.get("tie_word_embeddings")
    if tie is None:  # transformers' PretrainedConfig default
        tie = True
    values: dict[str, Any] = dict(
        vocab_size=int(hf_config["vocab_size"]),
        dim_model=hidden,
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
        dim_head=int(head_dim),
        dim_ff=int(hf_config["intermediate_size"]),
        activate_fn="silu",
        eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        base=_rope_theta(hf_config),
        max_length=int(hf_config.get("max_position_embeddings") or 8192),
        tie_lm_head=bool(tie),
        qkv_bias=qkv_bias,
        scale=scale,
        scale_emb=scale_emb,
        scale_depth=scale_depth,
        dim_model_base=dim_model_base,
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )
    torch_dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
    if isinstance(torch_dtype, str) and _as_dtype_or_none(torch_dtype) is not None:
        values["dtype"] = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[_as_dtype_or_none(torch_dtype)]
    try:
        cfg = FM9GConfig(**values)
    except ValueError as err:
        raise ConversionError(f"{source}: {err}") from None
    return cfg


def _as_dtype_or_none(name: str) -> torch.dtype | None:
    try:
        return _as_dtype(name)
    except ConversionError:
        return None


def load_hf_config(hf_dir: PathLike) -> FM9GConfig:
    """Infer the `FM9GConfig` of a Hugging Face directory (``config.json`` + the weight names).

    Raises:
        FileNotFoundError: no such directory / no config.json.
        ConversionError: unsupported architecture or feature (named).
    """
    path = _check_hf_dir(hf_dir)
    names = set(_hf_weight_index(path))
    return fm9g_config_from_hf(_read_json(path / "config.json"), tensor_names=names, source=str(path / "config.json"))


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
    heads, kv = config.num_heads, config.num_kv_heads
    out: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim_model,
        "intermediate_size": config.dim_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": config.dim_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_length,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.eps,
        "rope_theta": config.base,
        "use_cache": True,
        "attention_dropout": 0.0,
        "torch_dtype": _dtype_name(dtype),
    }
    ref = dict(reference or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in ref:
            out[key] = ref[key]
    if format == "fm9g":
        out.update(
            architectures=["FM9GForCausalLM"],
            model_type="fm9g",
            auto_map={
                "AutoConfig": "configuration_fm9g.FM9GConfig",
                "AutoModel": "modeling_fm9g.FM9GModel",
                "AutoModelForCausalLM": "modeling_fm9g.FM9GForCausalLM",
            },
            attention_bias=config.qkv_bias,
            tie_word_embeddings=config.tie_lm_head,
            scale=config.scale,
            scale_emb=config.scale_emb,
            scale_depth=config.scale_depth,
            dim_model_base=config.dim_model_base,
        )
    elif format == "native":
        out["tie_word_embeddings"] = config.tie_lm_head and not _native_unties(config)
        if config.qkv_bias:
            # Qwen2 has q/k/v biases and none on o_proj: exactly FM9G-7B's attention.
            out.update(
                architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers,
            )
        else:
            out.update(architectures=["LlamaForCausalLM"], model_type="llama",
                       attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        raise ConversionError(f"format must be 'native' or 'fm9g', got {format!r}")
    return out


def _native_unties(config: FM9GConfig) -> bool:
    """A tied head must be written separately in a native export when muP makes it differ."""
    return config.tie_lm_head and config.scale and (config.scale_emb != 1.0 or config.scale_width != 1.0)


def expected_bmt_shapes(config: FM9GConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of `FM9GModel(config)` (original names, from the key table of
    `fm9g.convert.keys`, in its order) and its shape."""
    from fm9g.convert.keys import expected_bmt_keys

    d, dh, ff, V = config.dim_model, config.dim_head, config.dim_ff, config.vocab_size
    q, kv = config.num_heads * dh, config.num_kv_heads * dh
    by_module = {  # last module name -> (weight shape, bias shape)
        "input_embedding": ((V, d), None),
        "lm_head": ((V, d), None),
        "project_q": ((q, d), (q,)),
        "project_k": ((kv, d), (kv,)),
        "project_v": ((kv, d), (kv,)),
        "attention_out": ((d, q), None),
        "w_0": ((ff, d), None),
        "w_1": ((ff, d), None),
        "w_out": ((d, ff), None),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for key in expected_bmt_keys(config):
        module, _, param = key.rpartition(".")
        leaf = module.rsplit(".", 1)[-1]
        if leaf.startswith("layernorm") or leaf == "output_layernorm":
            shapes[key] = (d,)
        else:
            weight, bias = by_module[leaf]
            shapes[key] = weight if param == "weight" else bias
    return shapes


def _check_state_dict(
    sd: Mapping[str, torch.Tensor], config: FM9GConfig, source: str, *, what: str = "checkpoint"
) -> None:
    """Raise one ConversionError naming every missing, unexpected and mis-shaped key."""
    expected = expected_bmt_shapes(config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: {tuple(sd[k].shape)} vs expected {expected[k]}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {name_list(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} missing keys: {name_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {name_list(unexpected)}")
    if problems:
        raise ConversionError(
            f"{source}: the {what} does not match the model config "
            f"(dim_model={config.dim_model}, num_layers={config.num_layers}, num_heads={config.num_heads}, "
            f"num_kv_heads={config.num_kv_heads}, dim_ff={config.dim_ff}, vocab_size={config.vocab_size}, "
            f"tie_lm_head={config.tie_lm_head}, qkv_bias={config.qkv_bias}): " + "; ".join(problems)
            + ". Pass the config the checkpoint was trained with (config=... or a config.json beside it)."
        )


# ================================================================================================
# reading weights (lazily, memory-mapped)
# ================================================================================================


def _hf_weight_files(path: Path) -> list[Path]:
    """The weight files of an HF directory, in index order (safetensors preferred)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, Mapping):
                raise ConversionError(f"{index}: no weight_map")
            files = list(dict.fromkeys(weight_map.values()))
            absent = [f for f in files if not (path / f).is_file()]
            if absent:
                raise FileNotFoundError(f"{index} lists shard(s) that are not in {path}: {name_list(absent)}")
            return [path / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise FileNotFoundError(
        f"{path} holds no weights: expected model.safetensors, model.safetensors.index.json + shards, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConversionError(f"{path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    return header


def _hf_weight_index(path: Path) -> list[str]:
    """Names of all weights of an HF directory, read cheaply (headers / index only)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            _hf_weight_files(path)  # checks the shards exist
            return list(_read_json(path / index_name)["weight_map"])
    files = _hf_weight_files(path)
    if files[0].suffix == ".safetensors":
        return list(_safetensors_header(files[0]))
    return list(_load_torch_file(files[0]))


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load` memory-mapped when the file is a zip archive (every file since torch 1.6)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err) and "zip" not in str(err):
            raise ConversionError(f"{path}: cannot be read by torch.load ({err})") from None
        obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as err:  # pickle errors, weights_only refusals
        raise ConversionError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from None
    return obj


def read_hf_state_dict(hf_dir: PathLike, stack: ExitStack) -> dict[str, torch.Tensor]:
    """All weights of an HF directory as memory-mapped tensors (no copy is made).

    Args:
        hf_dir: the directory.
        stack: keeps the safetensors files open; close it when done with the tensors.
    Returns:
        ``{hf_name: tensor}``.
    """
    from safetensors import safe_open

    path = _check_hf_dir(hf_dir)
    out: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(path):
        if file.suffix == ".safetensors":
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
        else:
            sd = _load_torch_file(file)
            if not isinstance(sd, Mapping):
                raise ConversionError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
            out.update(sd)
    return out


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), Mapping):
                return _unwrap_state_dict(obj[key], source)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{source}: entries that are not tensors: {name_list(bad)}")
    return dict(obj)


def _resolve_ckpt(ckpt: PathLike) -> Path:
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():  # a training step directory: its one model .pt (as the original resume does)
        live = sorted(path.glob("fm9g_live_checkpoint*.pt"))
        pts = sorted(p for p in path.glob("*.pt") if p.name != "trainer_state.pt")
        sts = sorted(path.glob("*.safetensors"))
        found = live or pts or sts
        if len(found) != 1:
            raise ConversionError(
                f"{path} is a directory with {len(found)} checkpoint files ({name_list([p.name for p in found])}); "
                "pass the .pt file itself"
            )
        path = found[0]
    return path


def read_bmt_checkpoint(ckpt: PathLike, stack: ExitStack) -> dict[str, torch.Tensor]:
    """A bmtrain-named checkpoint (``.pt`` or ``.safetensors``) as memory-mapped tensors.

    Args:
        ckpt: the file, or a step directory holding exactly one ``.pt``.
        stack: keeps a safetensors file open while the tensors are used.
    """
    path = _resolve_ckpt(ckpt)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        handle = stack.enter_context(safe_open(str(path), framework="pt"))
        return {name: handle.get_tensor(name) for name in handle.keys()}
    return _unwrap_state_dict(_load_torch_file(path), str(path))


# ================================================================================================
# writing safetensors, streaming
# ================================================================================================


@dataclass(kw_only=True)
class _TensorPlan:
    """One output tensor: its name, final shape / dtype, and how to make it (called once, late)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _write_safetensors(path: Path, plans: list[_TensorPlan], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file, producing and writing one tensor at a time."""
    header: dict[str, Any] = {}
    offset = 0
    for p in plans:
        if p.dtype not in _ST_DTYPES:
            raise ConversionError(f"{p.name}: dtype {p.dtype} cannot be stored in safetensors")
        header[p.name] = {"dtype": _ST_DTYPES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for p in plans:
            t = p.make()
            if tuple(t.shape) != p.shape or t.dtype != p.dtype:
                raise AssertionError(f"{p.name}: produced {tuple(t.shape)} {t.dtype}, planned {p.shape} {p.dtype}")
            t = t.detach().cpu().contiguous().reshape(-1)
            if t.numel():
                fh.write(memoryview(t.view(torch.uint8).numpy()))
            del t


def save_safetensors_sharded(
    out_dir: Path,
    plans: list[_TensorPlan],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    prefix: str = "model",
) -> list[str]:
    """Write ``plans`` as ``<prefix>.safetensors`` or ``<prefix>-0000i-of-0000n.safetensors`` shards
    plus ``<prefix>.safetensors.index.json`` (the Hugging Face layout). Returns the file names."""
    shards: list[list[_TensorPlan]] = [[]]
    size = 0
    for p in plans:
        if shards[-1] and size + p.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        _write_safetensors(out_dir / name, shard)
        weight_map.update({p.name: name for p in shard})
    if n > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": weight_map}
        (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


class _TmpDir:
    """A temporary directory beside ``dest`` that becomes ``dest`` on `commit` (else is removed)."""

    def __init__(self, dest: Path, overwrite: bool) -> None:
        self.dest = dest
        if dest.exists() and not dest.is_dir():
            raise FileExistsError(f"{dest} exists and is a file; choose a directory path for the output")
        if dest.is_dir() and any(dest.iterdir()) and not overwrite:
            raise FileExistsError(f"output directory {dest} exists and is not empty; pass overwrite=True or pick another")
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
        default_permissions(self.path, directory=True)

    def commit(self) -> None:
        old = None
        if self.dest.exists():
            old = Path(tempfile.mkdtemp(dir=self.dest.parent, prefix=f".{self.dest.name}.old-"))
            os.replace(self.dest, old / "x")
        os.replace(self.path, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def cleanup(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


# ================================================================================================
# HF -> bmtrain
# ================================================================================================


def hf_to_bmt(
    hf_dir: PathLike,
    out_path: PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    safetensors: bool = False,
    write_config: bool = True,
) -> FM9GConfig:
    """Convert a Hugging Face checkpoint directory into an fm9g / bmtrain checkpoint.

    Reads ``model.safetensors``, sharded safetensors with an index, or ``pytorch_model.bin``
    (sharded or not) of Llama, Qwen2, MiniCPM-style (muP) and fm9g / fm9g7b models. Writes the
    weights in the original bmtrain names (``input_embedding.weight``, ``encoder.layers.{i}...``,
    ``lm_head.weight`` only for untied heads) as a flat ``torch.save`` dict -- or safetensors when
    ``safetensors=True`` -- and ``config.json`` (`FM9GConfig.to_json`, the original model_configs
    shape) in the same directory.

    Tied heads: when the config ties the head, a stored ``lm_head.weight`` is dropped (transformers
    ignores it too; a warning is given if it differs from the embedding).

    Args:
        hf_dir: the Hugging Face directory (``config.json`` + weights).
        out_path: the ``.pt`` (or ``.safetensors``) file to write.
        dtype: cast the weights (``"bf16"``, ``"fp16"``, ``"fp32"``); None keeps them.
        safetensors: write safetensors instead of a torch pickle.
        write_config: write ``config.json`` beside ``out_path``.

    Returns:
        The inferred `FM9GConfig`.

    Raises:
        FileNotFoundError: missing directory, config.json or weights.
        ConversionError: unsupported architecture (named), unmapped or missing keys (all listed),
            shapes that contradict the config.
    """
    from fm9g.convert.keys import hf_to_bmt_key

    src = _check_hf_dir(hf_dir)
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ConversionError(f"out_path {out_path} is a directory; give a file name such as {out_path / 'model.pt'}")
    cast = _as_dtype(dtype)
    config = load_hf_config(src)
    beside = out_path.parent / "config.json"
    if write_config and beside.is_file():
        try:
            existing = json.loads(beside.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            existing = {}
        if isinstance(existing, dict) and "hidden_size" in existing and "model_type" in existing:
            raise ConversionError(
                f"{beside} is a Hugging Face config that writing the fm9g config.json would replace; "
                f"put {out_path.name} in another directory (e.g. 9g_models/{out_path.name})"
            )
    with ExitStack() as stack:
        hf_sd = read_hf_state_dict(src, stack)
        if config.tie_lm_head and "lm_head.weight" in hf_sd:
            head = hf_sd.pop("lm_head.weight")
            emb = hf_sd.get("model.embed_tokens.weight")
            if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
                warnings.warn(
                    f"{src}: tie_word_embeddings is true but lm_head.weight differs from the embedding; "
                    "it is dropped (transformers ignores it as well)",
                    stacklevel=2,
                )
        sd: dict[str, torch.Tensor] = {}
        unmapped: list[str] = []
        for name, tensor in hf_sd.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a non-persistent buffer some old exports stored
            try:
                key = hf_to_bmt_key(name)
            except (KeyError, ValueError):
                unmapped.append(name)
                continue
            sd[key] = tensor if cast is None else tensor.to(cast)
        if unmapped:
            raise ConversionError(
                f"{src}: {len(unmapped)} weights have no FM9G name: {name_list(unmapped)}; "
                "this is not a Llama / Qwen2 / MiniCPM-layout checkpoint"
            )
        _check_state_dict(sd, config, str(src), what="Hugging Face checkpoint")
        sd = {k: sd[k] for k in expected_bmt_shapes(config)}  # canonical order

        with atomic_file(out_path) as tmp:
            if safetensors:
                plans = [_TensorPlan(name=k, shape=tuple(v.shape), dtype=v.dtype, make=(lambda v=v: v)) for k, v in sd.items()]
                _write_safetensors(tmp, plans)
            else:
                torch.save(sd, tmp)
    if write_config:
        config.to_json(out_path.parent / "config.json")
    return config


# ================================================================================================
# bmtrain -> HF
# ================================================================================================


def _resolve_config(
    config: FM9GConfig | Mapping[str, Any] | PathLike | None, ckpt: Path, reference_dir: Path | None
) -> FM9GConfig:
    if isinstance(config, FM9GConfig):
        return config
    if isinstance(config, Mapping):
        return FM9GConfig.from_dict(dict(config), source="config")
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        return _config_from_json_file(path)
    beside = ckpt.parent / "config.json"
    if beside.is_file():
        return _config_from_json_file(beside)
    if reference_dir is not None:
        return load_hf_config(reference_dir)
    raise ConversionError(
        f"no model config for {ckpt}: pass config= (an FM9GConfig or a model_configs JSON), put config.json "
        "beside the checkpoint, or pass reference_dir= (a Hugging Face directory of the same model)"
    )


def _config_from_json_file(path: Path) -> FM9GConfig:
    """An original / fm9g model JSON, or a Hugging Face config.json."""
    data = _read_json(path)
    if "model_type" in data and "hidden_size" in data:
        return fm9g_config_from_hf(data, source=str(path))
    return FM9GConfig.from_json(path)


def _read_lora(
    lora: PathLike | Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], str, Path | None]:
    if isinstance(lora, Mapping):
        return _unwrap_state_dict(lora, "lora state dict"), "lora state dict", None
    path = Path(lora)
    if not path.exists():
        raise FileNotFoundError(f"LoRA checkpoint {str(path)!r} does not exist")
    path = _resolve_ckpt(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), str(path), path
    return _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), str(path)), str(path), path


def _lora_scale_from_files(lora_path: Path | None) -> tuple[float | None, int | None, str | None]:
    """(alpha, r, file) from a JSON beside the LoRA checkpoint, if any names them."""
    if lora_path is None:
        return None, None, None
    from fm9g.models.lora import LoraConfig

    for name in ("lora_config.json", "config.json", "train_config.json", "adapter_config.json"):
        f = lora_path.parent / name
        if not f.is_file():
            continue
        try:
            data = _read_json(f)
        except ConversionError:
            continue
        if name == "adapter_config.json" and "lora_alpha" in data:
            return float(data["lora_alpha"]), int(data["r"]), str(f)
        for section in (data, data.get("finetune"), data.get("lora")):
            if not isinstance(section, Mapping):
                continue
            if "lora_alpha" in section or "alpha" in section:
                try:
                    cfg = LoraConfig.from_dict(section, source=str(f))
                except ValueError:
                    continue
                return float(cfg.alpha), int(cfg.r), str(f)
    return None, None, None


def _prepare_lora(
    lora: PathLike | Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    *,
    lora_config: Any,
    lora_alpha: float | None,
    lora_r: int | None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int, Any]:
    """Validate a LoRA checkpoint against the base; returns ({module: (A, B)}, alpha, r, LoraConfig)."""
    from fm9g.models.lora import LoraConfig

    sd, source, path = _read_lora(lora)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    for key, value in sd.items():
        k = key.removeprefix("module.")
        m = re.fullmatch(r"(?P<mod>.+)\.lora\.(?P<kind>lora_A|lora_B)", k)
        if m is None:
            bad.append(key)
            continue
        pairs.setdefault(m["mod"], {})[m["kind"]] = value
    if bad:
        raise ConversionError(
            f"{source}: {len(bad)} tensors are not LoRA weights named '<module>.lora.lora_A/lora_B': {name_list(bad)}. "
            "Pass the LoRA checkpoint as lora= and the full base checkpoint as ckpt"
        )
    if not pairs:
        raise ConversionError(f"{source}: holds no LoRA tensors")
    problems: list[str] = []
    ranks: set[int] = set()
    for mod, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            problems.append(f"{mod}: has only {sorted(ab)}")
            continue
        weight = base.get(f"{mod}.weight")
        if weight is None:
            problems.append(f"{mod}: no such layer in the base checkpoint")
            continue
        a, b = ab["lora_A"], ab["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            problems.append(
                f"{mod}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base weight {tuple(weight.shape)}"
            )
            continue
        ranks.add(int(a.shape[0]))
    if problems:
        raise ConversionError(
            f"{source}: this LoRA checkpoint does not fit the base checkpoint ({len(problems)} problems: "
            f"{name_list(problems, 6)}). Was it trained on another model size?"
        )
    if len(ranks) != 1:
        raise ConversionError(f"{source}: LoRA layers have different ranks {sorted(ranks)}")
    r = ranks.pop()
    alpha: float | None = None
    where = ""
    if lora_config is not None:
        cfg = lora_config if isinstance(lora_config, LoraConfig) else (
            LoraConfig.from_json(lora_config) if isinstance(lora_config, (str, os.PathLike)) else LoraConfig.from_dict(lora_config)
        )
        alpha, given_r, where = float(cfg.alpha), cfg.r, "lora_config"
    else:
        file_alpha, given_r, where = _lora_scale_from_files(path)
        alpha = file_alpha
    if lora_alpha is not None:
        alpha, where = float(lora_alpha), "lora_alpha"
    if lora_r is not None:
        given_r = int(lora_r)
    if given_r is not None and given_r != r:
        raise ConversionError(f"{source}: the LoRA tensors have rank {r} but {where or 'lora_r'} says r={given_r}")
    if alpha is None:
        raise ConversionError(
            f"{source}: the LoRA alpha is unknown, so the merge scale alpha/r cannot be computed; pass lora_alpha= "
            "(CLI: --lora-alpha), lora_config= (a LoraConfig or the training JSON with a 'finetune' section), "
            "or put lora_config.json beside the LoRA checkpoint"
        )
    targets = sorted({mod.rsplit(".", 1)[-1] for mod in pairs})
    cfg = LoraConfig(r=r, alpha=int(alpha) if float(alpha).is_integer() else alpha, target_modules=targets)
    return {mod: (ab["lora_A"], ab["lora_B"]) for mod, ab in pairs.items()}, alpha, r, cfg


def _copy_reference_files(reference_dir: Path, out: Path) -> list[str]:
    copied = []
    patterns = [re.compile(p) for p in _REFERENCE_FILE_PATTERNS]
    for f in sorted(reference_dir.iterdir()):
        if f.is_file() and any(p.fullmatch(f.name) for p in patterns):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


def bmt_to_hf(
    ckpt: PathLike,
    out_dir: PathLike,
    config: FM9GConfig | Mapping[str, Any] | PathLike | None = None,
    reference_dir: PathLike | None = None,
    lora: PathLike | Mapping[str, torch.Tensor] | None = None,
    format: str = "native",
    *,
    lora_config: Any = None,
    lora_alpha: float | None = None,
    lora_r: int | None = None,
    lora_mode: str = "merge",
    dtype: str | torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Export an fm9g / bmtrain checkpoint as a Hugging Face directory.

    Args:
        ckpt: the ``.pt`` (or ``.safetensors``) in original names, or a step directory with one ``.pt``.
        out_dir: the directory to create (written to a temporary directory, renamed at the end).
        config: an `FM9GConfig`, a dict of its fields or a model JSON path; default: ``config.json`` beside ``ckpt``,
            else inferred from ``reference_dir``'s ``config.json``.
        reference_dir: a Hugging Face directory of the same model: tokenizer, generation and chat
            template files are copied from it (not its weights, config or code); its token ids are kept.
        lora: a LoRA checkpoint (``<module>.lora.lora_A`` / ``lora_B`` tensors, original or fm9g
            format) to merge: ``W += (alpha / r) · B @ A`` in fp32.
        format: ``"native"`` (Llama / Qwen2, muP folded) or ``"fm9g"`` (remote code, muP kept).
        lora_config: a `LoraConfig`, a dict or a JSON path (the training JSON with a ``finetune``
            section works) giving alpha and r; otherwise a ``lora_config.json`` / ``config.json``
            beside the LoRA checkpoint is read, or ``lora_alpha`` / ``lora_r`` are used.
        lora_alpha, lora_r: explicit LoRA scale values (override the others).
        lora_mode: ``"merge"`` (default) or ``"adapter"``: write the base weights plus a PEFT adapter
            in ``out_dir/adapter`` (load with ``peft.PeftModel.from_pretrained(model, out_dir/"adapter")``).
        dtype: cast the exported weights; None keeps the checkpoint's dtype.
        max_shard_size: bytes per safetensors shard (default 5 GiB).
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileNotFoundError / FileExistsError: missing inputs / existing output.
        ConversionError: keys or shapes that do not match the config (all listed), a LoRA checkpoint
            for another model, an unknown LoRA alpha, a bad format.
    """
    from fm9g.convert.keys import bmt_to_hf_key

    if format not in ("native", "fm9g"):
        raise ConversionError(f"format must be 'native' or 'fm9g', got {format!r}")
    if lora_mode not in ("merge", "adapter"):
        raise ConversionError(f"lora_mode must be 'merge' or 'adapter', got {lora_mode!r}")
    ckpt_path = _resolve_ckpt(ckpt)
    ref = _check_hf_dir(reference_dir) if reference_dir is not None else None
    cfg = _resolve_config(config, ckpt_path, ref)
    out = Path(out_dir)
    for inside, what in ((ckpt_path, "the checkpoint"), (ref, "reference_dir")):
        if inside is not None and (out.resolve() == inside.resolve() or out.resolve() in inside.resolve().parents):
            raise ConversionError(f"out_dir {out} would replace {what} {inside}; choose another output directory")
    cast = _as_dtype(dtype)
    ref_config = _read_json(ref / "config.json") if ref is not None else None

    with ExitStack() as stack:
        sd = read_bmt_checkpoint(ckpt_path, stack)
        if any(".lora.lora_" in k for k in sd):
            raise ConversionError(
                f"{ckpt_path}: holds LoRA tensors ({next(k for k in sd if '.lora.lora_' in k)}); pass the full base "
                "checkpoint as ckpt and the LoRA checkpoint as lora="
            )
        _check_state_dict(sd, cfg, str(ckpt_path))
        deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        lora_cfg = None
        alpha = r = 0
        if lora is not None:
            deltas, alpha, r, lora_cfg = _prepare_lora(lora, sd, lora_config=lora_config, lora_alpha=lora_alpha, lora_r=lora_r)
        merge = lora is not None and lora_mode == "merge"
        out_dtype = cast or sd["input_embedding.weight"].dtype

        # factors folded into weights for the native export
        res = cfg.residual_scale if format == "native" else 1.0
        emb_mult = cfg.scale_emb if (format == "native" and cfg.scale) else 1.0
        head_div = cfg.scale_width if format == "native" else 1.0
        untie = format == "native" and _native_unties(cfg)

        def producer(key: str, factor: float) -> Callable[[], torch.Tensor]:
            def make() -> torch.Tensor:
                t = sd[key]
                mod = key.removesuffix(".weight")
                merge_here = merge and key.endswith(".weight") and mod in deltas
                if not merge_here and factor == 1.0:
                    return t.to(out_dtype)  # no copy when the dtype is kept: written from the mmap
                # LoRA update and muP factor in fp32, one rounding at the end; in row blocks so a
                # large matrix (the 73k x d embedding) never exists in fp32 all at once
                result = torch.empty(t.shape, dtype=out_dtype)
                rows = max(1, _FOLD_BLOCK_ELEMENTS // max(1, t[0].numel()))
                for i in range(0, t.shape[0], rows):
                    w = t[i : i + rows].to(torch.float32, copy=True)  # never modify the source in place
                    if merge_here:
                        a, b = deltas[mod]
                        w += (b[i : i + rows].float() @ a.float()) * (alpha / r)
                    if factor != 1.0:
                        w *= factor
                    result[i : i + rows] = w
                return result
            return make

        plans: list[_TensorPlan] = []
        for key, shape in expected_bmt_shapes(cfg).items():
            factor = 1.0
            if key == "input_embedding.weight":
                factor = emb_mult
            elif key.endswith(("attention_out.weight", "ffn.w_out.weight")):
                factor = res
            elif key == "lm_head.weight":
                factor = 1.0 / head_div
            plans.append(_TensorPlan(name=bmt_to_hf_key(key), shape=shape, dtype=out_dtype, make=producer(key, factor)))
        if untie:  # tied muP head: its own lm_head = embedding / scale_width (the embedding got × scale_emb)
            emb_shape = (cfg.vocab_size, cfg.dim_model)
            plans.append(_TensorPlan(name="lm_head.weight", shape=emb_shape, dtype=out_dtype,
                                     make=producer("input_embedding.weight", 1.0 / cfg.scale_width)))

        hf_config = hf_config_from_fm9g(cfg, format=format, dtype=out_dtype, reference=ref_config)
        tmp = _TmpDir(out, overwrite)
        try:
            save_safetensors_sharded(tmp.path, plans, max_shard_size=max_shard_size)
            atomic_write_text(tmp.path / "config.json", json.dumps(hf_config, indent=2) + "\n")
            if format == "fm9g":
                for name in REMOTE_FILES:
                    shutil.copy2(REMOTE_CODE_DIR / name, tmp.path / name)
            if ref is not None:
                _copy_reference_files(ref, tmp.path)
            if lora is not None and lora_mode == "adapter":
                _write_peft_adapter(tmp.path / "adapter", deltas, lora_cfg, cfg, format, base=str(out))
            tmp.commit()
        finally:
            tmp.cleanup()
    return out


def _write_peft_adapter(
    adapter_dir: Path,
    deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    lora_cfg: Any,
    cfg: FM9GConfig,
    format: str,
    *,
    base: str,
) -> None:
    """A PEFT adapter via the LoRA module's `save_peft_adapter`, on a skeleton holding only the
    LoRA layers (base weights on the meta device, so nothing large is allocated)."""
    from torch import nn

    from fm9g.models.lora import LoraBranch, LoraLinear, load_lora_state_dict, save_peft_adapter

    root = nn.Module()
    root.config = cfg  # read by save_peft_adapter for the native muP factors
    for mod, (a, b) in deltas.items():
        parent = root
        *path, leaf = mod.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        base_linear = nn.Linear(a.shape[1], b.shape[0], bias=False, device="meta")
        layer = LoraLinear.from_linear(base_linear, r=lora_cfg.r, alpha=lora_cfg.alpha)
        layer.lora = LoraBranch(a.shape[1], b.shape[0], lora_cfg.r, lora_cfg.alpha, device="cpu", dtype=torch.float32)
        parent.add_module(leaf, layer)
    load_lora_state_dict(root, {f"{m}.lora.lora_A": ab[0] for m, ab in deltas.items()}
                         | {f"{m}.lora.lora_B": ab[1] for m, ab in deltas.items()}, source="LoRA checkpoint")
    save_peft_adapter(root, adapter_dir, base_model_name_or_path=base, format=format)


# ================================================================================================
# loading an FM9GModel from either format
# ================================================================================================


def load_pretrained(
    path_or_hf_dir: PathLike,
    *,
    config: FM9GConfig | PathLike | None = None,
    dtype: str | torch.dtype | None = None,
) -> "torch.nn.Module":
    """Build an `FM9GModel` with weights from an fm9g ``.pt`` / ``.safetensors`` or a Hugging Face
    directory (Llama, Qwen2, MiniCPM-style, fm9g / fm9g7b).

    Args:
        path_or_hf_dir: a checkpoint file (config from ``config`` or ``config.json`` beside it) or
            an HF directory (config inferred).
        config: overrides the config found next to a checkpoint file.
        dtype: cast the parameters (default: the checkpoint's dtype).

    Returns:
        The model in eval mode.
    """
    from fm9g.convert.keys import hf_to_bmt_key
    from fm9g.models.fm9g import FM9GModel

    path = Path(path_or_hf_dir)
    cast = _as_dtype(dtype)
    with ExitStack() as stack:
        if path.is_dir() and (path / "config.json").is_file() and not list(path.glob("*.pt")):
            cfg = load_hf_config(path) if config is None else _resolve_config(config, path, None)
            hf_sd = read_hf_state_dict(path, stack)
            if cfg.tie_lm_head:
                hf_sd.pop("lm_head.weight", None)
            sd = {hf_to_bmt_key(k): v for k, v in hf_sd.items() if not k.endswith("rotary_emb.inv_freq")}
            source = str(path)
        else:
            ckpt = _resolve_ckpt(path)
            cfg = _resolve_config(config, ckpt, None)
            sd = read_bmt_checkpoint(ckpt, stack)
            source = str(ckpt)
        _check_state_dict(sd, cfg, source)
        if cast is not None:
            sd = {k: v.to(cast) for k, v in sd.items()}
        with torch.device("meta"):  # no allocation, no init: the checkpoint's tensors are assigned
            model = FM9GModel(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
