"""Checkpoint conversion: HF <-> bmtrain names, both export formats, LoRA merge / adapter, bad input.

Everything runs on CPU with tiny fp32 models; the SmolLM2 test uses the session fixture.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fm9g.convert import files
from fm9g.convert import hf as conv
from fm9g.convert.hf import ConversionError, bmt_to_hf, hf_to_bmt, load_hf_config, load_pretrained
from fm9g.convert.keys import bmt_to_hf_key
from fm9g.models.config import FM9GConfig
from fm9g.models.fm9g import FM9GModel

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

V = 96


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (any layout), as plain tensors."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        return {k: v.clone() for k, v in conv.read_hf_state_dict(path, stack).items()}


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _randomize_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


def _tiny_config(kind: str) -> FM9GConfig:
    common = dict(vocab_size=V, dim_model=64, num_layers=2, dim_head=16, dim_ff=96, max_length=256,
                  dtype="fp32", init_std=0.1, use_checkpoint=False, attn_impl="sdpa")
    if kind == "4b":  # muP, tied, GQA
        return FM9GConfig(**common, num_heads=4, num_kv_heads=2, tie_lm_head=True, qkv_bias=False, scale=True,
                          scale_emb=12.0, scale_depth=1.4, dim_model_base=16, eps=1e-5, base=1e6)
    if kind == "7b":  # q/k/v bias, untied, MHA, no muP
        return FM9GConfig(**common, num_heads=4, num_kv_heads=4, tie_lm_head=False, qkv_bias=True, scale=False,
                          scale_emb=12.0, scale_depth=-1.0, dim_model_base=128, eps=1e-6, base=1e6)
    raise ValueError(kind)


def _save_fm9g(tmp: Path, kind: str, seed: int = 0) -> tuple[Path, FM9GModel]:
    torch.manual_seed(seed)
    cfg = _tiny_config(kind)
    model = FM9GModel(cfg).eval()
    _randomize_norms(model)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    cfg.to_json(tmp / "config.json")
    return tmp / "model.pt", model


def _ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (2, 9), generator=g)


def _make_hf_dir(tmp: Path, arch: str, tied: bool, *, seed: int = 0) -> Path:
    """A tiny HF checkpoint: Llama / Qwen2 through transformers, MiniCPM-style written by hand."""
    torch.manual_seed(seed)
    out = tmp / f"{arch}-{'tied' if tied else 'untied'}"
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, rope_theta=10000.0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    elif arch == "minicpm":
        cfg = FM9GConfig(vocab_size=V, dim_model=64, num_layers=2, num_heads=4, num_kv_heads=2, dim_ff=96,
                         tie_lm_head=tied, dtype="fp32")
        sd = {bmt_to_hf_key(k): torch.randn(s) * 0.1 for k, s in conv.expected_bmt_shapes(cfg).items()}
        out.mkdir(parents=True)
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        hf_cfg = dict(kw, architectures=["MiniCPMForCausalLM"], model_type="minicpm", hidden_act="silu",
                      rms_norm_eps=1e-5, scale_emb=12, scale_depth=1.4, dim_model_base=16, torch_dtype="float32")
        (out / "config.json").write_text(json.dumps(hf_cfg))
        return out
    else:
        raise ValueError(arch)
    _randomize_norms(model)
    model.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------
# HF -> bmt -> HF round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "minicpm"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_is_exact(tmp_path, arch, tied):
    src = _make_hf_dir(tmp_path, arch, tied)
    cfg = hf_to_bmt(src, tmp_path / "bmt" / "model.pt")
    assert cfg.tie_lm_head is tied
    assert cfg.qkv_bias is (arch == "qwen2")
    assert cfg.scale is (arch == "minicpm")
    sd = torch.load(tmp_path / "bmt" / "model.pt", weights_only=True)
    assert ("lm_head.weight" in sd) is (not tied)
    assert list(sd) == list(conv.expected_bmt_shapes(cfg))  # original names, canonical order
    assert FM9GConfig.from_json(tmp_path / "bmt" / "config.json") == cfg == load_hf_config(src)

    # MiniCPM-style muP only survives unfolded in the fm9g format; Llama / Qwen2 come back as themselves
    fmt = "fm9g" if arch == "minicpm" else "native"
    out = bmt_to_hf(tmp_path / "bmt" / "model.pt", tmp_path / "back", format=fmt)
    _assert_same_tensors(_hf_tensors(src), _hf_tensors(out))
    back = json.loads((out / "config.json").read_text())
    if arch == "minicpm":
        assert back["model_type"] == "fm9g"
        assert (back["scale"], back["scale_emb"], back["scale_depth"], back["dim_model_base"]) == (True, 12, 1.4, 16)
    else:
        assert back["model_type"] == arch
    assert back["tie_word_embeddings"] is tied


def test_reads_sharded_and_bin_layouts(tmp_path):
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    # pytorch_model.bin, whole and sharded with an index (transformers 5 no longer writes them)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("bin", "bin_sharded"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    keys = list(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for file, names in halves.items():
        torch.save({k: sd[k] for k in names}, tmp_path / "bin_sharded" / file)
    index = {"metadata": {}, "weight_map": {k: f for f, names in halves.items() for k in names}}
    (tmp_path / "bin_sharded" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ref = None
    for name in ("st", "sharded", "bin", "bin_sharded"):
        hf_to_bmt(tmp_path / name, tmp_path / f"{name}.pt")
        sd = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        if ref is None:
            ref = sd
        else:
            _assert_same_tensors(ref, sd)


def test_hf_to_bmt_dtype_and_safetensors(tmp_path):
    src = _make_hf_dir(tmp_path, "llama", tied=True)
    hf_to_bmt(src, tmp_path / "m.safetensors", dtype="bf16", safetensors=True)
    sd = load_file(tmp_path / "m.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    ref = _hf_tensors(src)
    torch.testing.assert_close(sd["input_embedding.weight"], ref["model.embed_tokens.weight"].bfloat16())
    # and bmt_to_hf reads safetensors checkpoints too
    out = bmt_to_hf(tmp_path / "m.safetensors", tmp_path / "hf")
    assert _hf_tensors(out)["model.norm.weight"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# exports load in stock transformers and reproduce FM9GModel
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["4b", "7b"])
def test_exports_match_fm9g_logits(tmp_path, kind):
    ckpt, model = _save_fm9g(tmp_path / "ckpt", kind)
    x = _ids()
    with torch.no_grad():
        ref = model(x).logits

    native = bmt_to_hf(ckpt, tmp_path / "native", format="native", max_shard_size=60_000)
    ncfg = json.loads((native / "config.json").read_text())
    assert "auto_map" not in ncfg and not list(native.glob("*.py"))
    assert ncfg["architectures"] == (["LlamaForCausalLM"] if kind == "4b" else ["Qwen2ForCausalLM"])
    assert ncfg["tie_word_embeddings"] is False  # 4B: muP makes the head differ from the embedding
    assert (native / "model.safetensors.index.json").exists()  # several shards
    hf = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref, rtol=0, atol=1e-4)

    remote = bmt_to_hf(ckpt, tmp_path / "fm9g", format="fm9g")
    rcfg = json.loads((remote / "config.json").read_text())
    assert rcfg["model_type"] == "fm9g" and rcfg["auto_map"]["AutoModelForCausalLM"] == "modeling_fm9g.FM9GForCausalLM"
    assert {p.name for p in remote.glob("*.py")} == {"configuration_fm9g.py", "modeling_fm9g.py"}
    hf9 = AutoModelForCausalLM.from_pretrained(remote, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf9).__name__ == "FM9GForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf9(x).logits, ref, rtol=0, atol=1e-4)
        # KV-cached greedy generation agrees between the remote code and the native export
        g9 = hf9.generate(x[:1], max_new_tokens=6, do_sample=False)
        gn = hf.generate(x[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(g9, gn)

    # the fm9g export reads back into the identical checkpoint (muP kept unfolded)
    cfg = hf_to_bmt(remote, tmp_path / "again" / "model.pt")
    arch_fields = ("vocab_size", "dim_model", "num_layers", "num_heads", "num_kv_heads", "dim_head", "dim_ff", "eps",
                   "base", "max_length", "tie_lm_head", "qkv_bias", "scale", "scale_emb", "scale_depth", "dim_model_base")
    assert {f: getattr(cfg, f) for f in arch_fields} == {f: getattr(model.config, f) for f in arch_fields}
    _assert_same_tensors(torch.load(ckpt, weights_only=True), torch.load(tmp_path / "again" / "model.pt", weights_only=True))
    # load_pretrained reads all three
    for src in (ckpt, native, remote):
        loaded = load_pretrained(src)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, ref, rtol=0, atol=1e-4)


def test_smollm2_greedy_text_survives_round_trip(tmp_path, smollm2_hf_dir, smollm2_model, smollm2_tokenizer):
    from transformers import AutoTokenizer

    cfg = hf_to_bmt(smollm2_hf_dir, tmp_path / "smol.pt")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_lm_head) == (9, 3, True)
    out = bmt_to_hf(tmp_path / "smol.pt", tmp_path / "hf", reference_dir=smollm2_hf_dir, format="native")
    assert (out / "tokenizer_config.json").exists() and not (out / "model.safetensors.index.json").exists()

    tok = AutoTokenizer.from_pretrained(out, padding_side="left")
    assert tok.get_vocab() == smollm2_tokenizer.get_vocab()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompts = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?"]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True)  # one batched greedy call per model
    with torch.no_grad():
        want = smollm2_model.generate(**batch, max_new_tokens=10, do_sample=False)
        got = exported.generate(**batch, max_new_tokens=10, do_sample=False)
    n = batch.input_ids.shape[1]
    answers = tok.batch_decode(got[:, n:], skip_special_tokens=True)
    assert answers == smollm2_tokenizer.batch_decode(want[:, n:], skip_special_tokens=True)
    assert "Paris" in answers[0] and all(a.strip() for a in answers), answers


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------


def _lora_checkpoint(tmp: Path, model: FM9GModel, *, r: int = 4, alpha: float = 8.0, write_config: bool = True):
    from fm9g.models.lora import LoraConfig, apply_lora, lora_state_dict

    lcfg = LoraConfig(r=r, alpha=alpha, target_modules=["project_q", "project_v", "attention_out", "w_0", "w_out"])
    apply_lora(model, lcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.clone() for k, v in lora_state_dict(model).items()}, tmp / "lora.pt")
    if write_config:
        lcfg.to_json(tmp / "lora_config.json")
    return tmp / "lora.pt", lcfg


@pytest.mark.parametrize("fmt", ["native", "fm9g"])
def test_merged_lora_equals_base_plus_adapter(tmp_path, fmt):
    peft = pytest.importorskip("peft")
    ckpt, model = _save_fm9g(tmp_path / "ckpt", "4b")
    lora_path, _ = _lora_checkpoint(tmp_path / "lora", model)
    x = _ids()
    with torch.no_grad():
        ref = model(x).logits  # FM9GModel with the LoRA branches

    merged = bmt_to_hf(ckpt, tmp_path / "merged", lora=lora_path, format=fmt)
    kw = dict(dtype=torch.float32, trust_remote_code=fmt == "fm9g")
    hf_merged = AutoModelForCausalLM.from_pretrained(merged, **kw).eval()
    base_adapter = bmt_to_hf(ckpt, tmp_path / "adapter", lora=lora_path, format=fmt, lora_mode="adapter")
    hf_base = AutoModelForCausalLM.from_pretrained(base_adapter, **kw).eval()
    with torch.no_grad():
        out_base = hf_base(x).logits
    with_adapter = peft.PeftModel.from_pretrained(hf_base, base_adapter / "adapter").eval()
    with torch.no_grad():
        out_merged = hf_merged(x).logits
        out_adapter = with_adapter(x).logits
    torch.testing.assert_close(out_merged, out_adapter, rtol=0, atol=1e-4)
    torch.testing.assert_close(out_merged, ref, rtol=0, atol=1e-4)
    assert not torch.allclose(out_merged, out_base, atol=1e-3)  # the LoRA did change something


def test_lora_alpha_sources_and_errors(tmp_path):
    ckpt, model = _save_fm9g(tmp_path / "ckpt", "7b")
    lora_path, lcfg = _lora_checkpoint(tmp_path / "lora", model, write_config=False)
    with pytest.raises(ConversionError, match="alpha is unknown"):
        bmt_to_hf(ckpt, tmp_path / "a", lora=lora_path)
    assert not (tmp_path / "a").exists()
    # original training JSON with a "finetune" section
    (tmp_path / "train.json").write_text(json.dumps({"pretrain": {}, "finetune": {"lora_r": 4, "lora_alpha": 8}}))
    a = bmt_to_hf(ckpt, tmp_path / "a", lora=lora_path, lora_config=tmp_path / "train.json")
    b = bmt_to_hf(ckpt, tmp_path / "b", lora=lora_path, lora_alpha=8.0)
    _assert_same_tensors(_hf_tensors(a), _hf_tensors(b))
    # an fm9g training step directory: fm9g_live_checkpoint-<step>.pt + trainer_state.pt + train_config.json
    step = tmp_path / "run" / "100"
    step.mkdir(parents=True)
    (step / "fm9g_live_checkpoint-100.pt").write_bytes(lora_path.read_bytes())
    torch.save({"step": 100}, step / "trainer_state.pt")
    (step / "config.json").write_text(_tiny_config("7b").to_json())
    (step / "train_config.json").write_text(json.dumps({"lr": 1e-4, "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}}))
    c = bmt_to_hf(ckpt, tmp_path / "step", lora=step)
    _assert_same_tensors(_hf_tensors(a), _hf_tensors(c))
    with pytest.raises(ConversionError, match="rank 4 but .*r=8"):
        bmt_to_hf(ckpt, tmp_path / "c", lora=lora_path, lora_alpha=8.0, lora_r=8)
    # a LoRA trained on another model shape
    _, other = _save_fm9g(tmp_path / "other", "4b")
    other_lora, _ = _lora_checkpoint(tmp_path / "other_lora", other)
    with pytest.raises(ConversionError, match="does not fit the base checkpoint"):
        bmt_to_hf(ckpt, tmp_path / "d", lora=other_lora)
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_to_bmt(tmp_path / "nope", tmp_path / "x.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_to_bmt(tmp_path / "empty", tmp_path / "x.pt")
    # unsupported architecture is named, with the supported ones
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    save_file({"wte.weight": torch.zeros(2, 2)}, gpt2 / "model.safetensors")
    with pytest.raises(ConversionError, match=r"'gpt2'.*GPT2LMHeadModel.*llama, qwen2, minicpm, fm9g, fm9g7b"):
        hf_to_bmt(gpt2, tmp_path / "x.pt")
    # config.json but no weights
    src = _make_hf_dir(tmp_path, "llama", tied=False)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        hf_to_bmt(noweights, tmp_path / "x.pt")
    # an extra weight the table does not know
    sd = _hf_tensors(src)
    sd["model.layers.0.self_attn.rotary.extra"] = torch.zeros(3)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="no FM9G name: model.layers.0.self_attn.rotary.extra"):
        hf_to_bmt(src, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    # writing into an HF directory would replace its config.json
    with pytest.raises(ConversionError, match="is a Hugging Face config"):
        hf_to_bmt(src, src / "model.pt")
    assert not (src / "model.pt").exists()

    # shape mismatch between a checkpoint and the given config names the key and both shapes
    ckpt, _ = _save_fm9g(tmp_path / "ckpt", "7b")
    wrong = FM9GConfig.from_dict({**_tiny_config("7b").to_dict(), "dim_ff": 128})
    with pytest.raises(ConversionError, match=r"w_0.weight: \(96, 64\) vs expected \(128, 64\)"):
        bmt_to_hf(ckpt, tmp_path / "out", config=wrong)
    with pytest.raises(ConversionError, match="missing keys: encoder.layers.2.*unexpected keys: lm_head.weight"):
        bmt_to_hf(ckpt, tmp_path / "out", config=FM9GConfig.from_dict({**_tiny_config("7b").to_dict(), "tie_lm_head": True, "num_layers": 3}))
    assert not (tmp_path / "out").exists()
    # no config anywhere
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(ConversionError, match="no model config"):
        bmt_to_hf(ckpt, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bmt_to_hf(tmp_path / "missing.pt", tmp_path / "out", config=_tiny_config("7b"))
    with pytest.raises(ConversionError, match="would replace the checkpoint"):
        bmt_to_hf(ckpt, ckpt.parent, config=_tiny_config("7b"), overwrite=True)
    assert ckpt.exists()
    with pytest.raises(ConversionError, match="format must be"):
        bmt_to_hf(ckpt, tmp_path / "out", config=_tiny_config("7b"), format="gguf")


def test_output_is_never_half_written(tmp_path, monkeypatch):
    ckpt, _ = _save_fm9g(tmp_path / "ckpt", "7b")
    out = bmt_to_hf(ckpt, tmp_path / "out")
    before = _hf_tensors(out)
    with pytest.raises(FileExistsError, match="not empty"):
        bmt_to_hf(ckpt, out)

    calls = {"n": 0}
    real = files.write_safetensors

    def failing(path, plans, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(path, plans, metadata)

    monkeypatch.setattr(files, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        bmt_to_hf(ckpt, out, overwrite=True, max_shard_size=60_000)
    # the old export is intact and no temporary directory is left behind
    _assert_same_tensors(before, _hf_tensors(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    monkeypatch.setattr(files, "write_safetensors", real)
    bmt_to_hf(ckpt, out, overwrite=True, max_shard_size=60_000)
    assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()


def test_config_inference_variants():
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    # transformers >= 5 writes rope_parameters instead of rope_theta
    cfg = conv.fm9g_config_from_hf({**base, "model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert cfg.base == 5e5 and cfg.num_kv_heads == 4 and cfg.tie_lm_head  # HF's default tie
    with pytest.raises(ConversionError, match="'llama3' is not supported"):
        conv.fm9g_config_from_hf({**base, "model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConversionError, match="o_proj"):
        conv.fm9g_config_from_hf({**base, "model_type": "llama", "attention_bias": True})
    # fm9g: muP when the three fields are present, unless "scale" says otherwise; fm9g7b: never muP
    mup = dict(scale_emb=12, scale_depth=1.4, dim_model_base=16)
    assert conv.fm9g_config_from_hf({**base, **mup, "model_type": "fm9g"}).scale
    assert not conv.fm9g_config_from_hf({**base, **mup, "model_type": "fm9g", "scale": False}).scale
    c7 = conv.fm9g_config_from_hf({**base, **mup, "model_type": "fm9g7b"})
    assert not c7.scale and c7.scale_depth == -1.0 and c7.qkv_bias


def test_cli_round_trip_and_errors(tmp_path, capsys):
    from fm9g.cli import main

    src = _make_hf_dir(tmp_path, "qwen2", tied=False)
    assert main(["convert", "hf2bmt", str(src), str(tmp_path / "m.pt")]) == 0
    assert main(["convert", "bmt2hf", str(tmp_path / "m.pt"), str(tmp_path / "hf"), "--format", "fm9g",
                 "--reference-dir", str(src), "--max-shard-size", "50KB"]) == 0
    assert (tmp_path / "hf" / "modeling_fm9g.py").exists()
    assert main(["convert", "bmt2hf", str(tmp_path / "m.pt"), str(tmp_path / "hf2")]) == 0
    _assert_same_tensors(_hf_tensors(src), _hf_tensors(tmp_path / "hf2"))
    capsys.readouterr()
    assert main(["convert", "hf2bmt", str(tmp_path / "nope"), str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_docs_quick_example_runs(tmp_path, monkeypatch):
    """The first python block of docs/convert.md is runnable as written."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "convert.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/convert.md", "exec"), {})
    assert (tmp_path / "tiny_hf" / "config.json").exists() and (tmp_path / "back" / "tiny.pt").exists()




def test_exports_in_other_transformers_version(tmp_path, compat_python):
    """Both export formats load and match FM9GModel in another transformers release (e.g. 4.44)."""
    import subprocess
    import sys

    for kind in ("4b", "7b"):
        ckpt, model = _save_fm9g(tmp_path / kind, kind)
        x = _ids()
        with torch.no_grad():
            torch.save({"x": x, "ref": model(x).logits}, tmp_path / kind / "ref.pt")
        for fmt in ("native", "fm9g"):
            bmt_to_hf(ckpt, tmp_path / kind / fmt, format=fmt)
    code = (
        "import sys, torch, transformers\n"
        "from transformers import AutoModelForCausalLM\n"
        "root = sys.argv[1]\n"
        "for kind in ('4b', '7b'):\n"
        "    ref = torch.load(f'{root}/{kind}/ref.pt', weights_only=True)\n"
        "    for fmt in ('native', 'fm9g'):\n"
        "        m = AutoModelForCausalLM.from_pretrained(f'{root}/{kind}/{fmt}', trust_remote_code=fmt == 'fm9g',\n"
        "                                                 torch_dtype=torch.float32).eval()\n"
        "        with torch.no_grad():\n"
        "            d = (m(ref['x']).logits - ref['ref']).abs().max().item()\n"
        "            m.generate(ref['x'][:1], max_new_tokens=3, do_sample=False)\n"
        "        assert d <= 1e-4, (kind, fmt, d)\n"
        "print('ok', transformers.__version__)\n"
    )
    out = subprocess.run([compat_python, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok"), out.stdout


@pytest.mark.gpu
@pytest.mark.vllm
def test_native_export_serves_in_vllm(tmp_path):
    """The native export runs in stock vLLM (no FM9G build) and decodes like transformers."""
    import vllm
    torch.manual_seed(0)
    cfg = FM9GConfig(vocab_size=512, dim_model=256, num_layers=2, num_heads=4, num_kv_heads=2, dim_head=64,
                     dim_ff=512, max_length=512, dtype="fp32", tie_lm_head=True, scale=True, scale_emb=12.0,
                     scale_depth=1.4, dim_model_base=64, init_std=0.1)
    model = FM9GModel(cfg).eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    cfg.to_json(tmp_path / "config.json")
    out = bmt_to_hf(tmp_path / "m.pt", tmp_path / "hf", format="native")
    prompt = [5, 17, 33, 101, 7]
    ids = torch.tensor([prompt])
    for _ in range(8):  # greedy reference from FM9GModel in fp32
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    llm = vllm.LLM(model=str(out), skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3,
                   enforce_eager=True)
    res = llm.generate([{"prompt_token_ids": prompt}], vllm.SamplingParams(max_tokens=8, temperature=0.0))
    got = list(res[0].outputs[0].token_ids)
    assert got[:4] == ids[0, len(prompt):len(prompt) + 4].tolist()


def test_original_fm9g7b_layout_with_pytorch_bin(tmp_path):
    """The released 7B layout: model_type "fm9g7b", pytorch_model.bin, q/k/v biases, no muP keys used."""
    ckpt, model = _save_fm9g(tmp_path / "ckpt", "7b")
    native = bmt_to_hf(ckpt, tmp_path / "native")
    orig = tmp_path / "orig7b"
    orig.mkdir()
    hf_cfg = json.loads((native / "config.json").read_text())
    hf_cfg.update(model_type="fm9g7b", architectures=["FM9GForCausalLM"], scale_emb=12, dim_model_base=128, scale_depth=-1)
    (orig / "config.json").write_text(json.dumps(hf_cfg))
    torch.save(_hf_tensors(native), orig / "pytorch_model.bin")
    cfg = hf_to_bmt(orig, tmp_path / "back" / "model.pt")
    assert cfg.qkv_bias and not cfg.scale and not cfg.tie_lm_head
    _assert_same_tensors(torch.load(ckpt, weights_only=True), torch.load(tmp_path / "back" / "model.pt", weights_only=True))
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(orig)(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_tied_config_with_stored_head(tmp_path):
    """tie_word_embeddings=true wins over a stored lm_head.weight (as in transformers): it is dropped,
    with a warning only when it differs from the embedding."""
    import warnings

    src = _make_hf_dir(tmp_path, "llama", tied=True)
    sd = _hf_tensors(src)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_to_bmt(src, tmp_path / "a.pt")
    assert "lm_head.weight" not in torch.load(tmp_path / "a.pt", weights_only=True)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="lm_head.weight differs from the embedding"):
        hf_to_bmt(src, tmp_path / "b.pt")
    assert "lm_head.weight" not in torch.load(tmp_path / "b.pt", weights_only=True)


def test_fold_in_row_blocks_equals_one_block():
    """muP folding and LoRA merging run in row blocks (a 73k-row embedding never exists in fp32 at
    once): any block size gives the same bits as one block."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(37, 24, generator=g).to(torch.bfloat16)
    a, b = torch.randn(4, 24, generator=g), torch.randn(37, 4, generator=g)
    for delta in (None, (a, b, 0.5)):
        whole = conv._fold(t, torch.bfloat16, 1.4, delta, block_elements=10**9)
        for block in (1, 24 * 5, 24 * 36):
            assert torch.equal(conv._fold(t, torch.bfloat16, 1.4, delta, block_elements=block), whole), block
