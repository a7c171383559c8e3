"""`FM9GConfig`: the model hyper-parameters of the FM9G ("Dragonfly") decoder, with presets.

The field names and defaults are those of the original bmtrain `model_configs/*.json` files, so
those files load unchanged (`FM9GConfig.from_json("model_configs/7b.json")`). A Hugging Face
`config.json` is read by `fm9g.convert.hf_config` (`load_model_config` reads either kind).

Example::

    cfg = FM9GConfig.from_name("fm9g-7b")
    cfg.num_parameters()        # 7_668_...  (≈ 7.67 B)
    cfg.to_json("7b.json")
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from fm9g._io import ConfigError, atomic_write_text, parse_bool, read_json
from fm9g.models.attention import ATTENTION_BACKENDS

__all__ = ["FM9GConfig", "ConfigError", "PRESETS", "DTYPES", "PRECISIONS", "dtype_name"]

# ConfigError (from fm9g._io, the one config error class of fm9g): a model config that cannot be
# used: an unknown key, a bad value or inconsistent shapes.

# Keys found in the original model_configs JSON (or HF config.json) that the model does not use.
# They are accepted, kept in `FM9GConfig.extra` and written back by `to_json`, so files round-trip.
INFORMATIONAL_KEYS: frozenset[str] = frozenset(
    {
        "half",  # the original always trains in `dtype` (class default bf16); this flag is not read
        "half_type",
        "use_flash_attn",  # attention backend is chosen by `attn_impl` instead
        "flash_attn_mask_shape",
        "ori_max_length",  # a typo in the originals: the class field is `orig_max_length`
        "model_type",
        "architectures",
        "tp",  # overwritten at runtime by the original launcher
        "pose_prob",  # PoSE position augmentation (data side); not implemented, kept for round trip
        "pose_scaling_factor",
        "rope_scaling_type",  # only "" / None (no scaling) is supported; checked in __post_init__
        "rope_scaling_factor",
        "auto_map",
        "torch_dtype",
        "transformers_version",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "initializer_range",
        "attention_dropout",
        "mlp_bias",
        "pretraining_tp",
        "rope_scaling",
        "rope_parameters",
        "attention_bias",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
    }
)

#: The one dtype table: name -> (torch dtype, safetensors code). bf16 / fp16 / fp32 are the
#: precisions a config names (`PRECISIONS`); the others let any checkpoint tensor be stored.
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "bf16": (torch.bfloat16, "BF16"), "fp16": (torch.float16, "F16"), "fp32": (torch.float32, "F32"),
    "fp64": (torch.float64, "F64"), "int64": (torch.int64, "I64"), "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"), "int8": (torch.int8, "I8"), "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
}
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")
# other spellings of the precisions (a "torch." prefix is accepted as well)
_DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "bf16", "half": "fp16", "float16": "fp16", "float": "fp32", "float32": "fp32",
}


def dtype_name(value: str | torch.dtype) -> str | None:
    """The `PRECISIONS` name of a dtype given as a torch dtype or any spelling (``"bfloat16"``,
    ``"torch.float16"``, ``"half"``, ``"fp32"``, ...), or None when it is none of them."""
    key = str(value).lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(key, key)
    return name if name in PRECISIONS else None


ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "relu")
# fields read with fm9g._io.parse_bool ("false" is false) and fields that must be finite numbers
BOOL_FIELDS: tuple[str, ...] = ("ffn_gated", "tie_lm_head", "qkv_bias", "qk_norm", "scale", "use_checkpoint")
FLOAT_FIELDS: tuple[str, ...] = ("eps", "base", "scale_emb", "scale_depth", "init_std", "dropout_p")
ATTN_IMPLS: tuple[str, ...] = ("auto", *ATTENTION_BACKENDS)


@dataclass(kw_only=True)
class FM9GConfig:
    """Hyper-parameters of an FM9G decoder (docs/model.md). Defaults are the original class defaults.

    Args:
        vocab_size: number of token ids V.
        dim_model: hidden width d.
        num_layers: number of decoder layers L.
        num_heads: query heads h.
        num_kv_heads: key/value heads (GQA when < num_heads; must divide num_heads).
        dim_head: per-head width dh (None → dim_model // num_heads).
        dim_ff: FFN inner width.
        activate_fn: FFN activation ("silu"; the FFN is gated: W_out(act(W_0 x) * W_1 x)).
        ffn_gated: must be True (every FM9G model uses the gated FFN).
        eps: RMSNorm epsilon.
        base: RoPE theta.
        max_length: training context length (RoPE works for any length; used by data tools).
        orig_max_length: the original's RoPE-scaling reference length (kept for round trip).
        tie_lm_head: share the input embedding as output head (no `lm_head.weight`).
        qkv_bias: q/k/v projections carry a bias (7B / 70B).
        qk_norm: not implemented by the original either; must be False.
        scale: muP switch: embedding × scale_emb, logits input ÷ scale_width, init std ÷ √scale_width.
        scale_emb: embedding multiplier (only when scale).
        scale_depth: residual branches × scale_depth/√L when > 0 (independent of `scale`).
        dim_model_base: muP base width (scale_width = dim_model / dim_model_base when scale).
        init_std: init standard deviation (see `FM9GModel.init_weights`).
        dropout_p: attention dropout; must be 0.0 (all FM9G configs use 0).
        use_checkpoint: per-layer activation checkpointing; the default of a training run whose
            TrainConfig leaves `use_checkpoint` unset (docs/training.md, "Training-time switches").
        dtype: the original files' compute dtype ("bf16", "fp16" or "fp32"), kept for round trip;
            parameters are built in torch's default dtype and the training precision is
            TrainConfig's `precision`.
        attn_impl: attention backend ("auto", "sdpa", "flex", "torch_varlen", "flash_attn",
            "flash_attn_4"); a TrainConfig `attn_impl` overrides it for training.
        extra: informational keys of the source file (e.g. `half_type`), kept for `to_json`.
    """

    vocab_size: int = 122753
    dim_model: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    dim_head: int | None = None
    dim_ff: int = 11008
    activate_fn: str = "silu"
    ffn_gated: bool = True
    eps: float = 1e-5
    base: float = 10000.0
    max_length: int = 8192
    orig_max_length: int = 8192
    tie_lm_head: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    scale: bool = False
    scale_emb: float = 1.0
    scale_depth: float = -1.0
    dim_model_base: int = 256
    init_std: float = 0.02
    dropout_p: float = 0.0
    use_checkpoint: bool = True
    dtype: str = "bf16"
    attn_impl: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        for name in BOOL_FIELDS:
            setattr(self, name, parse_bool(getattr(self, name), name))
        for name in FLOAT_FIELDS:
            setattr(self, name, _finite_float(getattr(self, name), name))
        if self.dim_head is None:
            if self.num_heads <= 0 or self.dim_model % self.num_heads:
                raise ConfigError(
                    f"dim_head is not set and dim_model={self.dim_model} is not divisible by "
                    f"num_heads={self.num_heads}: set dim_head explicitly"
                )
            self.dim_head = self.dim_model // self.num_heads
        for name in ("vocab_size", "dim_model", "num_layers", "num_heads", "num_kv_heads", "dim_head",
                     "dim_ff", "max_length", "dim_model_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}: "
                "grouped-query attention needs num_heads % num_kv_heads == 0"
            )
        if self.dim_head % 2:
            raise ConfigError(f"dim_head={self.dim_head} must be even (rotary embedding rotates halves)")
        if self.activate_fn not in ACTIVATIONS:
            raise ConfigError(f"activate_fn={self.activate_fn!r} is not supported; use one of {list(ACTIVATIONS)}")
        if not self.ffn_gated:
            raise ConfigError("ffn_gated=False is not supported: every FM9G model uses the gated FFN")
        if self.qk_norm:
            raise ConfigError("qk_norm=True is not supported (the original accepts it but never applies it); set it to false")
        if not (0.0 <= self.dropout_p < 1.0):
            raise ConfigError(f"dropout_p must be in [0, 1), got {self.dropout_p}")
        if self.dropout_p != 0.0:
            raise ConfigError(f"dropout_p={self.dropout_p} is not supported: FM9G trains with dropout_p=0.0")
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if not self.base > 0:
            raise ConfigError(f"base (RoPE theta) must be > 0, got {self.base}")
        if not self.init_std > 0:
            raise ConfigError(f"init_std must be > 0, got {self.init_std}")
        dtype = dtype_name(self.dtype)
        if dtype is None:
            raise ConfigError(f"dtype={self.dtype!r} is not known; use one of {sorted(PRECISIONS)}")
        self.dtype = dtype
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"attn_impl={self.attn_impl!r} is not known; use one of {list(ATTN_IMPLS)}")
        rope_type = self.extra.get("rope_scaling_type")
        if rope_type not in (None, "", "none"):
            raise ConfigError(
                f"rope_scaling_type={rope_type!r} is not supported (only unscaled RoPE); remove the key or set it to \"\""
            )
        self.base = float(self.base)
        self.eps = float(self.eps)
        self.scale_emb = float(self.scale_emb)
        self.scale_depth = float(self.scale_depth)

    # ------------------------------------------------------------------ derived values
    @property
    def scale_width(self) -> float:
        """muP width multiplier: dim_model / dim_model_base when `scale`, else 1.0."""
        return self.dim_model / self.dim_model_base if self.scale else 1.0

    @property
    def residual_scale(self) -> float:
        """Multiplier of each residual branch: scale_depth / √num_layers when scale_depth > 0, else 1.0."""
        return self.scale_depth / math.sqrt(self.num_layers) if self.scale_depth > 0 else 1.0

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch dtype."""
        return DTYPES[self.dtype][0]

    def num_parameters(self, *, include_embedding: bool = True) -> int:
        """Number of parameters of `FM9GModel(self)`, counted from the shapes (no model is built).

        Args:
            include_embedding: count the input embedding (and the untied head).
        Returns:
            the parameter count (int).
        """
        d, dh = self.dim_model, self.dim_head
        q, kv = self.num_heads * dh, self.num_kv_heads * dh
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        ffn = 3 * d * self.dim_ff
        per_layer = attn + ffn + 2 * d  # + two RMSNorm weights
        total = self.num_layers * per_layer + d  # + output norm
        if include_embedding:
            total += self.vocab_size * d * (1 if self.tie_lm_head else 2)
        return total

    # ------------------------------------------------------------------ presets / IO
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "FM9GConfig":
        """A preset by name: fm9g-4b, fm9g-7b, fm9g-70b, fm9g-2.4b, fm9g-8b or tiny.

        Args:
            name: preset name (case-insensitive; the short ``"7b"`` is ``fm9g-7b``).
            **overrides: field values replacing the preset's.
        Raises:
            ConfigError: unknown preset (the message lists them) or a bad override.
        """
        key = name.lower()
        if key not in PRESETS and f"fm9g-{key}" in PRESETS:  # the original configs' short names: "7b"
            key = f"fm9g-{key}"
        if key not in PRESETS:
            close = difflib.get_close_matches(key, PRESETS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}.{hint}")
        values = dict(PRESETS[key])
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "FM9GConfig":
        """Build from a dict of original (bmtrain) keys.

        Informational keys (`half_type`, `model_type`, ...) go to `extra`. An unknown key raises
        `ConfigError` naming it (and the closest known key). A Hugging Face ``config.json`` uses
        other names: `fm9g.convert.hf_config.fm9g_config_from_hf` reads it.

        Args:
            data: the key/value pairs.
            source: a name for error messages (e.g. the file path).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = dict(data.get("extra") or {})
        unknown: list[str] = []
        for key, value in data.items():
            if key == "extra":
                continue
            if key in names:
                values[key] = value
            elif key in INFORMATIONAL_KEYS:
                extra[key] = value
            else:
                unknown.append(key)
        if unknown:
            known = sorted(names | INFORMATIONAL_KEYS)
            parts = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"{source}: unknown model config key(s) {', '.join(parts)}; "
                f"fix or remove them (known keys: {', '.join(sorted(names - {'extra'}))}; a Hugging Face "
                "config.json is read by fm9g.convert.hf_config.load_model_config)"
            )
        if "dtype" not in values and "half_type" in extra:
            values["dtype"] = extra["half_type"]
        values["extra"] = extra
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "FM9GConfig":
        """Load an original `model_configs/*.json` unchanged.

        Raises:
            ConfigError: unreadable JSON, unknown key or inconsistent values (the file is named).
        """
        data = read_json(path, error=ConfigError)
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Fields (original names) followed by the informational `extra` keys; JSON-serialisable."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Serialise to JSON (and write it atomically to `path` when given). Returns the text."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text


def _finite_float(value: Any, name: str) -> float:
    """`value` (a number, or a number written as a string) as a finite float.

    Raises:
        ConfigError: not a number, or NaN / infinite (naming the key).
    """
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return number


_FM9G_COMMON: dict[str, Any] = dict(
    activate_fn="silu", ffn_gated=True, qk_norm=False, init_std=0.1, dropout_p=0.0, dtype="bf16"
)

PRESETS: dict[str, dict[str, Any]] = {
    "fm9g-4b": dict(
        _FM9G_COMMON, vocab_size=73448, dim_model=2560, num_layers=62, num_heads=40, num_kv_heads=4,
        dim_head=64, dim_ff=6400, eps=1e-5, base=1_000_000.0, max_length=32768, orig_max_length=8192,
        tie_lm_head=True, qkv_bias=False, scale=True, scale_emb=12.0, scale_depth=1.4,
        dim_model_base=256, use_checkpoint=True,
    ),
    "fm9g-7b": dict(
        _FM9G_COMMON, vocab_size=73448, dim_model=3584, num_layers=28, num_heads=28, num_kv_heads=28,
        dim_head=128, dim_ff=18944, eps=1e-6, base=1_000_000.0, max_length=32768, orig_max_length=8192,
        tie_lm_head=False, qkv_bias=True, scale=False, scale_emb=12.0, scale_depth=-1.0,
        dim_model_base=128, use_checkpoint=True,
    ),
    "fm9g-70b": dict(
        _FM9G_COMMON, vocab_size=73448, dim_model=8192, num_layers=80, num_heads=64, num_kv_heads=64,
        dim_head=128, dim_ff=29568, eps=1e-6, base=1_000_000.0, max_length=32768, orig_max_length=8192,
        tie_lm_head=False, qkv_bias=True, scale=False, scale_emb=12.0, scale_depth=-1.0,
        dim_model_base=128, use_checkpoint=True,
    ),
    "fm9g-2.4b": dict(
        _FM9G_COMMON, vocab_size=122753, dim_model=2304, num_layers=40, num_heads=36, num_kv_heads=36,
        dim_head=64, dim_ff=5760, eps=1e-5, base=10000.0, max_length=8192, orig_max_length=8192,
        tie_lm_head=True, qkv_bias=False, scale=True, scale_emb=12.0, scale_depth=1.4,
        dim_model_base=256, use_checkpoint=True,
    ),
    "fm9g-8b": dict(
        _FM9G_COMMON, vocab_size=119696, dim_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        dim_head=128, dim_ff=14336, eps=1e-5, base=10000.0, max_length=8192, orig_max_length=8192,
        tie_lm_head=False, qkv_bias=False, scale=False, scale_emb=12.0, scale_depth=-1.0,
        dim_model_base=256, use_checkpoint=True,
    ),
    # A 4B-shaped toy (GQA, tied head, muP on) for tests and CPU examples.
    "tiny": dict(
        _FM9G_COMMON, vocab_size=99, dim_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
        dim_head=16, dim_ff=160, eps=1e-5, base=10000.0, max_length=256, orig_max_length=256,
        tie_lm_head=True, qkv_bias=False, scale=True, scale_emb=12.0, scale_depth=1.4,
        dim_model_base=16, use_checkpoint=False, dtype="fp32",
    ),
}
