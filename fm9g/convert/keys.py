"""One declarative name table between bmtrain (FM9G) and Hugging Face Llama / Qwen2 names.

Each row maps a *module* path on both sides; `{i}` stands for the layer index. Parameter names
are the module path plus a parameter suffix (`weight`, or `bias` where the row allows it). The
HF → bmtrain direction is the same table read backwards: no ordered string replacement.

    bmt_to_hf_key("encoder.layers.3.ffn.ffn.w_in.w_0.weight") == "model.layers.3.mlp.gate_proj.weight"
    hf_to_bmt_key("model.norm.weight") == "encoder.output_layernorm.weight"
    convert_state_dict(sd, to="hf", config=cfg)   # strict: every missing / unknown key is listed

Module-level helpers (`bmt_to_hf_module`, `hf_to_bmt_module`) serve LoRA / PEFT name mapping.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping, TypeVar

from fm9g._io import name_list

if TYPE_CHECKING:  # pragma: no cover
    from fm9g.models.config import FM9GConfig

__all__ = [
    "KeyMappingError",
    "NAME_TABLE",
    "bmt_to_hf_key",
    "hf_to_bmt_key",
    "bmt_to_hf_module",
    "hf_to_bmt_module",
    "expected_bmt_keys",
    "expected_hf_keys",
    "convert_state_dict",
]

T = TypeVar("T")


class KeyMappingError(KeyError):
    """State-dict names that do not map, or a state dict missing / having extra names.

    Attributes:
        unknown: names no table row matches.
        missing: names the config requires that are absent.
        unexpected: names present that the config does not have (e.g. biases without qkv_bias).
    """

    def __init__(self, message: str, *, unknown: list[str] = (), missing: list[str] = (),  # type: ignore[assignment]
                 unexpected: list[str] = ()) -> None:  # type: ignore[assignment]
        super().__init__(message)
        self.message = message
        self.unknown, self.missing, self.unexpected = list(unknown), list(missing), list(unexpected)

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message


@dataclass(frozen=True, kw_only=True)
class NameRow:
    """One module on both sides. `params`: parameter suffixes this module may carry."""

    bmt: str
    hf: str
    params: tuple[str, ...] = ("weight",)


# The table (docs/convert.md). Order does not matter: rows are matched as whole-name patterns.
NAME_TABLE: tuple[NameRow, ...] = (
    NameRow(bmt="input_embedding", hf="model.embed_tokens"),
    NameRow(bmt="encoder.output_layernorm", hf="model.norm"),
    NameRow(bmt="lm_head", hf="lm_head"),
    NameRow(bmt="encoder.layers.{i}.self_att.layernorm_before_attention", hf="model.layers.{i}.input_layernorm"),
    NameRow(bmt="encoder.layers.{i}.self_att.self_attention.project_q", hf="model.layers.{i}.self_attn.q_proj", params=("weight", "bias")),
    NameRow(bmt="encoder.layers.{i}.self_att.self_attention.project_k", hf="model.layers.{i}.self_attn.k_proj", params=("weight", "bias")),
    NameRow(bmt="encoder.layers.{i}.self_att.self_attention.project_v", hf="model.layers.{i}.self_attn.v_proj", params=("weight", "bias")),
    NameRow(bmt="encoder.layers.{i}.self_att.self_attention.attention_out", hf="model.layers.{i}.self_attn.o_proj"),
    NameRow(bmt="encoder.layers.{i}.ffn.layernorm_before_ffn", hf="model.layers.{i}.post_attention_layernorm"),
    NameRow(bmt="encoder.layers.{i}.ffn.ffn.w_in.w_0", hf="model.layers.{i}.mlp.gate_proj"),
    NameRow(bmt="encoder.layers.{i}.ffn.ffn.w_in.w_1", hf="model.layers.{i}.mlp.up_proj"),
    NameRow(bmt="encoder.layers.{i}.ffn.ffn.w_out", hf="model.layers.{i}.mlp.down_proj"),
)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>0|[1-9][0-9]*)") + "$")


# (source pattern, target template, row) for each direction, derived from the one table.
_TO_HF = [(_pattern(r.bmt), r.hf, r) for r in NAME_TABLE]
_TO_BMT = [(_pattern(r.hf), r.bmt, r) for r in NAME_TABLE]


def _map_module(name: str, rules: list[tuple[re.Pattern[str], str, NameRow]]) -> tuple[str, NameRow] | None:
    for pattern, target, row in rules:
        m = pattern.match(name)
        if m:
            return (target.format(i=m.group("i")) if "{i}" in target else target), row
    return None


def _map_key(name: str, rules: list[tuple[re.Pattern[str], str, NameRow]]) -> str | None:
    module, _, param = name.rpartition(".")
    hit = _map_module(module, rules)
    if hit is None or param not in hit[1].params:
        return None
    return f"{hit[0]}.{param}"


def bmt_to_hf_module(name: str) -> str:
    """bmtrain module path → HF module path (e.g. for LoRA target names). Raises KeyMappingError."""
    hit = _map_module(name, _TO_HF)
    if hit is None:
        raise KeyMappingError(f"no HF name for bmtrain module {name!r}", unknown=[name])
    return hit[0]


def hf_to_bmt_module(name: str) -> str:
    """HF module path → bmtrain module path. Raises KeyMappingError."""
    hit = _map_module(name, _TO_BMT)
    if hit is None:
        raise KeyMappingError(f"no bmtrain name for HF module {name!r}", unknown=[name])
    return hit[0]


def bmt_to_hf_key(name: str) -> str:
    """bmtrain parameter name → HF name. Raises KeyMappingError for a name the table lacks."""
    out = _map_key(name, _TO_HF)
    if out is None:
        raise KeyMappingError(f"no HF name for bmtrain key {name!r} (see fm9g.convert.keys.NAME_TABLE)", unknown=[name])
    return out


def hf_to_bmt_key(name: str) -> str:
    """HF parameter name → bmtrain name. Raises KeyMappingError for a name the table lacks."""
    out = _map_key(name, _TO_BMT)
    if out is None:
        raise KeyMappingError(f"no bmtrain name for HF key {name!r} (see fm9g.convert.keys.NAME_TABLE)", unknown=[name])
    return out


def expected_bmt_keys(config: "FM9GConfig") -> list[str]:
    """Every bmtrain parameter name `FM9GModel(config)` has (no lm_head when tied)."""
    keys = ["input_embedding.weight"]
    for i in range(config.num_layers):
        for row in NAME_TABLE:
            if "{i}" not in row.bmt:
                continue
            for param in row.params:
                if param == "bias" and not config.qkv_bias:
                    continue
                keys.append(f"{row.bmt.format(i=i)}.{param}")
    keys.append("encoder.output_layernorm.weight")
    if not config.tie_lm_head:
        keys.append("lm_head.weight")
    return keys


def expected_hf_keys(config: "FM9GConfig") -> list[str]:
    """Every HF parameter name of the matching Llama / Qwen2 checkpoint (no lm_head when tied)."""
    return [bmt_to_hf_key(k) for k in expected_bmt_keys(config)]


def convert_state_dict(
    state_dict: Mapping[str, T],
    to: Literal["hf", "bmt"],
    config: "FM9GConfig | None" = None,
) -> dict[str, T]:
    """Rename every key of a state dict through the table.

    Args:
        state_dict: name → tensor (values are passed through untouched).
        to: "hf" (bmtrain → HF) or "bmt" (HF → bmtrain).
        config: when given, the result must hold exactly the parameters of that config; for a tied
            head, the HF `lm_head.weight` is dropped going to bmt (it must equal the embedding) and
            never emitted going to hf.
    Returns:
        a new dict with the converted names.
    Raises:
        KeyMappingError: listing ALL unknown names, and (with config) all missing / unexpected ones.
        ValueError: `to` is neither "hf" nor "bmt".
    """
    if to not in ("hf", "bmt"):
        raise ValueError(f"to must be 'hf' or 'bmt', got {to!r}")
    mapper = bmt_to_hf_key if to == "hf" else hf_to_bmt_key
    tied = config is not None and config.tie_lm_head
    out: dict[str, T] = {}
    unknown: list[str] = []
    for name, value in state_dict.items():
        if tied and name == "lm_head.weight":
            if to == "bmt":
                embed = state_dict.get("model.embed_tokens.weight")
                if embed is not None and not _same_values(value, embed):
                    raise KeyMappingError(
                        "config.tie_lm_head is true but HF lm_head.weight differs from model.embed_tokens.weight; "
                        "set tie_lm_head=false to keep a separate head",
                        unexpected=[name],
                    )
            continue  # the tied head is the embedding: no key of its own
        try:
            out[mapper(name)] = value
        except KeyMappingError:
            unknown.append(name)
    missing: list[str] = []
    unexpected: list[str] = []
    if config is not None:
        expected = expected_bmt_keys(config) if to == "bmt" else expected_hf_keys(config)
        expected_set = set(expected)
        missing = [k for k in expected if k not in out]
        unexpected = [k for k in out if k not in expected_set]
    if unknown or missing or unexpected:
        side = "bmtrain" if to == "hf" else "HF"
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown {side} key(s): {name_list(unknown, 20, quote=True)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s) for this config: {name_list(missing, 20, quote=True)}")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) this config does not have: {name_list(unexpected, 20, quote=True)}")
        raise KeyMappingError(
            "cannot convert state dict: " + "; ".join(parts)
            + " (check the checkpoint matches the config: num_layers, qkv_bias, tie_lm_head)",
            unknown=unknown, missing=missing, unexpected=unexpected,
        )
    return out


def _same_values(a: object, b: object) -> bool:
    try:
        import torch

        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.device.type == "meta" or b.device.type == "meta":
                return a.shape == b.shape
            return a.shape == b.shape and bool(torch.equal(a, b))
    except ImportError:  # pragma: no cover
        pass
    return a is b
