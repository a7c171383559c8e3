"""FM9GConfig: presets, the original model_configs JSON files, aliases, errors, round trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm9g.convert.hf_config import fm9g_config_from_hf, load_model_config
from fm9g.models.config import ConfigError, FM9GConfig

# The original apps/fm9g_{4b,7b}/model_configs JSON shapes (docs/model.md), written out here.
ORIGINAL_4B = {
    "vocab_size": 73448, "dim_model": 2560, "dim_ff": 6400, "num_layers": 62, "num_heads": 40,
    "num_kv_heads": 4, "dim_head": 64, "activate_fn": "silu", "ffn_gated": True, "eps": 1e-5,
    "base": 1000000, "max_length": 32768, "ori_max_length": 32768, "tie_lm_head": True, "qk_norm": False,
    "scale": True, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "init_std": 0.1,
    "dropout_p": 0.0, "half": True, "half_type": "bf16", "use_flash_attn": True,
    "flash_attn_mask_shape": "2d", "use_checkpoint": True, "model_type": "fm9g",
    "architectures": ["FM9GForCausalLM"],
}
ORIGINAL_7B = {
    "vocab_size": 73448, "dim_model": 3584, "dim_ff": 18944, "num_layers": 28, "num_heads": 28,
    "num_kv_heads": 28, "dim_head": 128, "activate_fn": "silu", "ffn_gated": True, "eps": 1e-6,
    "base": 1000000, "max_length": 32768, "ori_max_length": 32768, "tie_lm_head": False, "qkv_bias": True,
    "qk_norm": False, "scale": False, "scale_emb": 12, "scale_depth": -1, "dim_model_base": 128,
    "init_std": 0.1, "dropout_p": 0.0, "half": True, "half_type": "bf16", "use_flash_attn": True,
    "flash_attn_mask_shape": "2d", "use_checkpoint": False, "model_type": "fm9g",
    "architectures": ["FM9GForCausalLM"],
}


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return path


def test_presets_exact_values() -> None:
    c4 = FM9GConfig.from_name("fm9g-4b")
    assert (c4.vocab_size, c4.dim_model, c4.num_layers, c4.num_heads, c4.num_kv_heads, c4.dim_head, c4.dim_ff) == \
        (73448, 2560, 62, 40, 4, 64, 6400)
    assert (c4.eps, c4.base, c4.max_length, c4.tie_lm_head, c4.qkv_bias) == (1e-5, 1e6, 32768, True, False)
    assert (c4.scale, c4.scale_emb, c4.scale_depth, c4.dim_model_base, c4.init_std) == (True, 12.0, 1.4, 256, 0.1)
    assert c4.scale_width == 10.0 and abs(c4.residual_scale - 0.17780) < 1e-5

    c7 = FM9GConfig.from_name("fm9g-7b")
    assert (c7.dim_model, c7.num_layers, c7.num_heads, c7.num_kv_heads, c7.dim_head, c7.dim_ff) == \
        (3584, 28, 28, 28, 128, 18944)
    assert (c7.eps, c7.base, c7.tie_lm_head, c7.qkv_bias, c7.scale, c7.scale_depth) == (1e-6, 1e6, False, True, False, -1.0)
    assert c7.scale_width == 1.0 and c7.residual_scale == 1.0

    c70 = FM9GConfig.from_name("FM9G-70B")  # case-insensitive
    assert (c70.dim_model, c70.num_layers, c70.num_heads, c70.num_kv_heads, c70.dim_ff, c70.qkv_bias) == \
        (8192, 80, 64, 64, 29568, True)

    c24 = FM9GConfig.from_name("fm9g-2.4b")
    assert (c24.vocab_size, c24.dim_model, c24.num_layers, c24.num_heads, c24.dim_head, c24.dim_ff) == \
        (122753, 2304, 40, 36, 64, 5760)
    assert (c24.base, c24.max_length, c24.tie_lm_head, c24.scale, c24.scale_depth) == (10000.0, 8192, True, True, 1.4)
    assert c24.scale_width == 9.0

    c8 = FM9GConfig.from_name("fm9g-8b")
    assert (c8.vocab_size, c8.dim_model, c8.num_layers, c8.num_heads, c8.dim_ff, c8.eps, c8.base) == \
        (119696, 4096, 32, 32, 14336, 1e-5, 10000.0)
    assert (c8.tie_lm_head, c8.scale) == (False, False)

    tiny = FM9GConfig.from_name("tiny")
    assert tiny.vocab_size == 99 and tiny.num_layers == 2 and tiny.dtype == "fp32"


def test_parameter_counts_match_spec() -> None:
    assert round(FM9GConfig.from_name("fm9g-7b").num_parameters() / 1e9, 2) == 7.67
    assert round(FM9GConfig.from_name("fm9g-4b").num_parameters() / 1e9, 2) == 4.13
    assert round(FM9GConfig.from_name("fm9g-70b").num_parameters() / 1e9, 1) == 80.8


def test_unknown_preset_suggests() -> None:
    with pytest.raises(ConfigError, match="fm9g-7b"):
        FM9GConfig.from_name("fm9g-7")


@pytest.mark.parametrize("data,preset", [(ORIGINAL_4B, "fm9g-4b"), (ORIGINAL_7B, "fm9g-7b")])
def test_original_json_loads_unchanged(tmp_path: Path, data: dict, preset: str) -> None:
    cfg = FM9GConfig.from_json(_write(tmp_path, "m.json", data))
    ref = FM9GConfig.from_name(preset)
    for name in ("vocab_size", "dim_model", "num_layers", "num_heads", "num_kv_heads", "dim_head", "dim_ff",
                 "eps", "base", "tie_lm_head", "qkv_bias", "scale", "scale_emb", "scale_depth",
                 "dim_model_base", "init_std"):
        assert getattr(cfg, name) == getattr(ref, name), name
    assert cfg.dtype == "bf16"
    assert cfg.extra["half_type"] == "bf16" and cfg.extra["ori_max_length"] == 32768
    assert cfg.extra["architectures"] == ["FM9GForCausalLM"]
    assert cfg.orig_max_length == 8192  # `ori_max_length` is informational, as in the original


def test_to_json_round_trip(tmp_path: Path) -> None:
    cfg = FM9GConfig.from_json(_write(tmp_path, "7b.json", ORIGINAL_7B))
    out = tmp_path / "sub" / "out.json"
    cfg.to_json(out)
    again = FM9GConfig.from_json(out)
    assert again == cfg
    assert json.loads(out.read_text())["half_type"] == "bf16"
    for name in ("fm9g-4b", "fm9g-70b", "tiny"):
        c = FM9GConfig.from_name(name)
        assert FM9GConfig.from_dict(json.loads(c.to_json())) == c


def test_hf_alias_names(tmp_path: Path) -> None:
    hf = {"vocab_size": 49152, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
          "intermediate_size": 1536, "num_hidden_layers": 30, "rms_norm_eps": 1e-5, "hidden_act": "silu",
          "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
          "model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    cfg = load_model_config(_write(tmp_path, "config.json", hf))
    assert (cfg.dim_model, cfg.num_heads, cfg.num_kv_heads, cfg.dim_head, cfg.dim_ff, cfg.num_layers) == \
        (576, 9, 3, 64, 1536, 30)
    assert (cfg.eps, cfg.base, cfg.max_length, cfg.tie_lm_head) == (1e-5, 100000.0, 8192, True)
    # transformers 5 stores theta in rope_parameters
    v5 = {k: v for k, v in hf.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_theta": 50000.0, "rope_type": "default"}
    assert fm9g_config_from_hf(v5).base == 50000.0


def test_conflicting_alias_rejected() -> None:
    with pytest.raises(ConfigError, match="hidden_size"):
        FM9GConfig.from_dict({"dim_model": 64, "hidden_size": 128, "num_heads": 4})


def test_unknown_key_named_with_suggestion(tmp_path: Path) -> None:
    bad = dict(ORIGINAL_7B, num_kv_head=28)
    path = _write(tmp_path, "bad.json", bad)
    with pytest.raises(ConfigError) as err:
        FM9GConfig.from_json(path)
    msg = str(err.value)
    assert "'num_kv_head'" in msg and "did you mean 'num_kv_heads'" in msg and str(path) in msg


@pytest.mark.parametrize(
    "change,words",
    [
        ({"num_heads": 28, "num_kv_heads": 8}, ["num_heads=28", "num_kv_heads=8"]),
        ({"dim_head": 63}, ["dim_head=63"]),
        ({"num_layers": 0}, ["num_layers"]),
        ({"activate_fn": "tanh"}, ["activate_fn"]),
        ({"qk_norm": True}, ["qk_norm"]),
        ({"dropout_p": 0.1}, ["dropout_p"]),
        ({"dtype": "int8"}, ["dtype"]),
        ({"rope_scaling_type": "YaRN"}, ["rope_scaling_type"]),
        ({"attn_impl": "xformers"}, ["attn_impl"]),
    ],
)
def test_bad_values_name_the_fields(tmp_path: Path, change: dict, words: list[str]) -> None:
    path = _write(tmp_path, "bad.json", dict(ORIGINAL_7B, **change))
    with pytest.raises(ConfigError) as err:
        FM9GConfig.from_json(path)
    for word in words:
        assert word in str(err.value)
    assert str(path) in str(err.value)


def test_invalid_json_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "dim_model": 64,\n  "num_heads": \n}')
    with pytest.raises(ConfigError, match="line"):
        FM9GConfig.from_json(path)


def test_keyword_only_and_dim_head_default() -> None:
    with pytest.raises(TypeError):
        FM9GConfig(99)  # type: ignore[misc]
    assert FM9GConfig(dim_model=96, num_heads=6, num_kv_heads=2).dim_head == 16


def test_hf_config_json_from_transformers(tmp_path: Path) -> None:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    LlamaConfig(**common).save_pretrained(tmp_path / "llama")
    Qwen2Config(**common).save_pretrained(tmp_path / "qwen2")
    llama = load_model_config(tmp_path / "llama" / "config.json")
    qwen2 = load_model_config(tmp_path / "qwen2" / "config.json")
    for cfg in (llama, qwen2):
        assert (cfg.dim_model, cfg.num_kv_heads, cfg.dim_head, cfg.base, cfg.eps) == (64, 2, 16, 5000.0, 1e-6)
    assert (llama.qkv_bias, qwen2.qkv_bias) == (False, True)
    LlamaConfig(**common, attention_bias=True).save_pretrained(tmp_path / "biased")
    with pytest.raises(ConfigError, match="attention_bias"):
        load_model_config(tmp_path / "biased" / "config.json")
