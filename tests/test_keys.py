"""The bmtrain <-> HF name table: every row both ways, strictness, tied head."""
from __future__ import annotations

import pytest
import torch

from fm9g.convert.keys import (
    NAME_TABLE,
    KeyMappingError,
    bmt_to_hf_key,
    bmt_to_hf_module,
    convert_state_dict,
    expected_bmt_keys,
    expected_hf_keys,
    hf_to_bmt_key,
    hf_to_bmt_module,
)
from fm9g.models.config import FM9GConfig
from fm9g.models.fm9g import FM9GModel

# The documented names (docs/convert.md), written out independently of the table.
PAIRS = [
    ("input_embedding.weight", "model.embed_tokens.weight"),
    ("encoder.output_layernorm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("encoder.layers.0.self_att.layernorm_before_attention.weight", "model.layers.0.input_layernorm.weight"),
    ("encoder.layers.12.self_att.self_attention.project_q.weight", "model.layers.12.self_attn.q_proj.weight"),
    ("encoder.layers.12.self_att.self_attention.project_q.bias", "model.layers.12.self_attn.q_proj.bias"),
    ("encoder.layers.3.self_att.self_attention.project_k.bias", "model.layers.3.self_attn.k_proj.bias"),
    ("encoder.layers.79.self_att.self_attention.project_v.weight", "model.layers.79.self_attn.v_proj.weight"),
    ("encoder.layers.5.self_att.self_attention.attention_out.weight", "model.layers.5.self_attn.o_proj.weight"),
    ("encoder.layers.5.ffn.layernorm_before_ffn.weight", "model.layers.5.post_attention_layernorm.weight"),
    ("encoder.layers.1.ffn.ffn.w_in.w_0.weight", "model.layers.1.mlp.gate_proj.weight"),
    ("encoder.layers.1.ffn.ffn.w_in.w_1.weight", "model.layers.1.mlp.up_proj.weight"),
    ("encoder.layers.10.ffn.ffn.w_out.weight", "model.layers.10.mlp.down_proj.weight"),
]


@pytest.mark.parametrize("bmt,hf", PAIRS)
def test_each_name_both_directions(bmt: str, hf: str) -> None:
    assert bmt_to_hf_key(bmt) == hf
    assert hf_to_bmt_key(hf) == bmt


def test_modules_map_for_lora_targets() -> None:
    assert bmt_to_hf_module("encoder.layers.2.self_att.self_attention.project_q") == "model.layers.2.self_attn.q_proj"
    assert hf_to_bmt_module("model.layers.2.mlp.down_proj") == "encoder.layers.2.ffn.ffn.w_out"


@pytest.mark.parametrize(
    "name",
    ["encoder.layers.0.self_att.self_attention.attention_out.bias",  # o_proj never has a bias
     "encoder.layers.0.ffn.ffn.w_out.bias",
     "encoder.layers.x.ffn.ffn.w_out.weight",
     "encoder.layers.01.ffn.ffn.w_out.weight",
     "encoder.layers.0.ffn.ffn.w_in.w_2.weight",
     "position_bias.weight",
     "prefix.input_embedding.weight"],
)
def test_unknown_bmt_names_raise(name: str) -> None:
    with pytest.raises(KeyMappingError, match="no HF name"):
        bmt_to_hf_key(name)


def test_table_is_one_to_one() -> None:
    assert len({r.bmt for r in NAME_TABLE}) == len({r.hf for r in NAME_TABLE}) == len(NAME_TABLE)


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_state_dict_round_trip(tied: bool, bias: bool) -> None:
    cfg = FM9GConfig.from_name("tiny", tie_lm_head=tied, qkv_bias=bias, num_layers=3)
    sd = FM9GModel(cfg).state_dict()
    hf = convert_state_dict(sd, to="hf", config=cfg)
    assert list(hf) == expected_hf_keys(cfg)
    assert ("lm_head.weight" in hf) is (not tied)
    back = convert_state_dict(hf, to="bmt", config=cfg)
    assert list(back) == list(sd) == expected_bmt_keys(cfg)
    assert all(back[k] is sd[k] for k in sd)


def test_all_unknown_and_missing_keys_listed() -> None:
    cfg = FM9GConfig.from_name("tiny", num_layers=2)
    hf = convert_state_dict(FM9GModel(cfg).state_dict(), to="hf", config=cfg)
    del hf["model.layers.1.mlp.up_proj.weight"]
    del hf["model.norm.weight"]
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(1)
    hf["model.extra_thing.weight"] = torch.zeros(1)
    with pytest.raises(KeyMappingError) as err:
        convert_state_dict(hf, to="bmt", config=cfg)
    e = err.value
    assert e.unknown == ["model.layers.0.self_attn.rotary_emb.inv_freq", "model.extra_thing.weight"]
    assert e.missing == ["encoder.layers.1.ffn.ffn.w_in.w_1.weight", "encoder.output_layernorm.weight"]
    msg = str(e)
    for name in e.unknown + e.missing:
        assert name in msg


def test_unexpected_bias_reported() -> None:
    cfg = FM9GConfig.from_name("tiny")  # no qkv_bias
    sd = FM9GModel(FM9GConfig.from_name("tiny", qkv_bias=True)).state_dict()
    with pytest.raises(KeyMappingError) as err:
        convert_state_dict(sd, to="hf", config=cfg)
    assert len(err.value.unexpected) == 3 * cfg.num_layers
    assert "qkv_bias" in str(err.value)


def test_tied_head_dropped_only_when_equal() -> None:
    cfg = FM9GConfig.from_name("tiny")  # tied
    hf = convert_state_dict(FM9GModel(cfg).state_dict(), to="hf", config=cfg)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    assert "lm_head.weight" not in convert_state_dict(hf, to="bmt", config=cfg)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"] + 1
    with pytest.raises(KeyMappingError, match="tie_lm_head"):
        convert_state_dict(hf, to="bmt", config=cfg)


def test_without_config_only_names_are_checked() -> None:
    out = convert_state_dict({"model.layers.7.mlp.gate_proj.weight": 1}, to="bmt")
    assert out == {"encoder.layers.7.ffn.ffn.w_in.w_0.weight": 1}
    with pytest.raises(KeyMappingError):
        convert_state_dict({"nope": 1, "model.norm.weight": 2}, to="bmt")
    with pytest.raises(ValueError):
        convert_state_dict({}, to="gguf")  # type: ignore[arg-type]
