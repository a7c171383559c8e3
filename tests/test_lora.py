"""LoRA: config parsing, injection, merge / unmerge, original checkpoints and PEFT adapters.

CPU, fp32. The generic tests run on a small hand-built module tree with the FM9G module names;
the parity tests use FM9GModel (tiny) against transformers' Llama / Qwen2 + peft.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fm9g.convert.peft import HF_TO_ORIGINAL_TARGET, load_peft_adapter, save_peft_adapter
from fm9g.models.lora import (
    ORIGINAL_TARGETS,
    LoraConfig,
    LoraError,
    LoraLinear,
    apply_lora,
    count_parameters,
    get_lora_config,
    load_lora_checkpoint,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    save_lora_checkpoint,
    trainable_parameters,
    reset_lora_parameters,
    unload_lora,
    unmerge_lora,
)

ALL7 = list(ORIGINAL_TARGETS)


# ---------------------------------------------------------------------------------------------
# A small module tree with the FM9G names (independent of FM9GModel)
# ---------------------------------------------------------------------------------------------

class _RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.project_q = nn.Linear(d, d, bias=True)
        self.project_k = nn.Linear(d, d // 2, bias=True)
        self.project_v = nn.Linear(d, d // 2, bias=True)
        self.attention_out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.project_q(x).view(B, T, self.heads, -1).transpose(1, 2)          # (B, h, T, dh)
        k = self.project_k(x).view(B, T, self.heads // 2, -1).transpose(1, 2)     # (B, kv, T, dh)
        v = self.project_v(x).view(B, T, self.heads // 2, -1).transpose(1, 2)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attention_out(a.transpose(1, 2).reshape(B, T, -1))


class _Toy(nn.Module):
    """input_embedding / encoder.layers[i].{self_att,ffn} / encoder.output_layernorm / lm_head."""

    def __init__(self, vocab: int = 50, d: int = 16, ff: int = 24, layers: int = 2) -> None:
        super().__init__()
        self.input_embedding = nn.Embedding(vocab, d)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.self_att = nn.Module()
            blk.self_att.layernorm_before_attention = _RMSNorm(d)
            blk.self_att.self_attention = _Attention(d, heads=4)
            blk.ffn = nn.Module()
            blk.ffn.layernorm_before_ffn = _RMSNorm(d)
            blk.ffn.ffn = nn.Module()
            blk.ffn.ffn.w_in = nn.Module()
            blk.ffn.ffn.w_in.w_0 = nn.Linear(d, ff, bias=False)
            blk.ffn.ffn.w_in.w_1 = nn.Linear(d, ff, bias=False)
            blk.ffn.ffn.w_out = nn.Linear(ff, d, bias=False)
            self.encoder.layers.append(blk)
        self.encoder.output_layernorm = _RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.checkpointing = False

    def _block(self, blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
        h = h + blk.self_att.self_attention(blk.self_att.layernorm_before_attention(h))
        x = blk.ffn.layernorm_before_ffn(h)
        f = blk.ffn.ffn
        return h + f.w_out(torch.nn.functional.silu(f.w_in.w_0(x)) * f.w_in.w_1(x))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.input_embedding(ids)
        for blk in self.encoder.layers:
            if self.checkpointing:
                h = torch.utils.checkpoint.checkpoint(self._block, blk, h, use_reentrant=False)
            else:
                h = self._block(blk, h)
        return self.lm_head(self.encoder.output_layernorm(h))


def _toy(seed: int = 0, **kw) -> _Toy:
    torch.manual_seed(seed)
    return _Toy(**kw)


def _ids(seed: int = 1, B: int = 2, T: int = 7, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomize_lora(model: nn.Module, seed: int = 3, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora.lora_B.copy_(torch.randn(m.lora.lora_B.shape, generator=g) * std)


def _train_steps(model: nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    for _ in range(steps):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


# ---------------------------------------------------------------------------------------------
# LoraConfig
# ---------------------------------------------------------------------------------------------

def test_config_maps_hf_names_and_dedupes():
    cfg = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "project_q", "v_proj", "down_proj", "o_proj"])
    assert cfg.target_modules == ["project_q", "project_v", "w_out", "attention_out"]
    assert cfg.scaling == 2.0


def test_config_presets_match_original_effective_settings():
    c7 = LoraConfig.from_name("fm9g-7b")
    assert (c7.r, c7.alpha, c7.dropout, c7.target_modules) == (64, 32, 0.0, ALL7)
    c4 = LoraConfig.from_name("fm9g-4b")
    assert (c4.r, c4.alpha, c4.dropout, c4.target_modules) == (16, 32, 0.0, ALL7)
    c70 = LoraConfig.from_name("fm9g-70b")
    assert (c70.r, c70.alpha, c70.dropout, c70.target_modules) == (16, 32, 0.0, ["project_q", "project_v"])
    assert LoraConfig.from_name("7b", dropout=0.1).dropout == 0.1
    with pytest.raises(LoraError, match="unknown LoRA preset 'fm9g-13b'"):
        LoraConfig.from_name("fm9g-13b")


def test_config_from_original_finetune_section(tmp_path):
    path = tmp_path / "7b_lora.json"
    path.write_text(json.dumps({
        "pretrain": {"lr": 1e-5},
        "finetune": {"lora_r": 64, "lora_alpha": 32, "lora_dropout": 0.0, "lr": 1e-4,
                     "lora_layer": "['project_q','project_v', 'attention_out']"},
    }))
    cfg = LoraConfig.from_json(path)
    assert (cfg.r, cfg.alpha, cfg.dropout) == (64, 32, 0.0)
    assert cfg.target_modules == ["project_q", "project_v", "attention_out"]
    # a JSON list works too, and a bare comma list
    assert LoraConfig.from_dict({"lora_r": 4, "lora_layer": ["q_proj"]}).target_modules == ["project_q"]
    assert LoraConfig.from_dict({"lora_r": 4, "lora_layer": "project_q, w_0"}).target_modules == ["project_q", "w_0"]


def test_config_literal_is_not_evaluated():
    with pytest.raises(LoraError, match="lora_layer|target_modules"):
        LoraConfig.from_dict({"lora_r": 4, "lora_layer": "__import__('os').system('echo hacked')"})


def test_config_json_round_trip(tmp_path):
    cfg = LoraConfig(r=4, alpha=8.5, dropout=0.05, target_modules=["w_0", "w_1"])
    text = cfg.to_json(tmp_path / "lora.json")
    assert json.loads(text) == {"r": 4, "alpha": 8.5, "dropout": 0.05, "target_modules": ["w_0", "w_1"]}
    assert LoraConfig.from_json(tmp_path / "lora.json") == cfg


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive integer, got 0"),
    (dict(r=-4), "got -4"),
    (dict(r=2.5), "got 2.5"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(target_modules=[]), "target_modules is empty"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(LoraError, match=message):
        LoraConfig(**kwargs)


def test_config_from_dict_errors(tmp_path):
    with pytest.raises(LoraError, match=r"unknown keys \['rank'\]"):
        LoraConfig.from_dict({"rank": 4})
    with pytest.raises(LoraError, match="both"):
        LoraConfig.from_dict({"lora_r": 4, "r": 8})
    with pytest.raises(LoraError, match="lora_r.*|r must be a positive integer, got 0"):
        LoraConfig.from_dict({"finetune": {"lora_r": 0}})
    bad = tmp_path / "bad.json"
    bad.write_text('{"r": 4,,}')
    with pytest.raises(LoraError, match=r"bad.json: invalid JSON at line 1"):
        LoraConfig.from_json(bad)


# ---------------------------------------------------------------------------------------------
# Injection, freezing, counting
# ---------------------------------------------------------------------------------------------

def test_apply_lora_with_zero_B_changes_nothing_and_reuses_parameters():
    model = _toy()
    ids = _ids()
    ref = model(ids)
    q = model.encoder.layers[0].self_att.self_attention.project_q
    w, b = q.weight, q.bias
    sd_keys = set(model.state_dict())
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=ALL7))
    new_q = model.encoder.layers[0].self_att.self_attention.project_q
    assert isinstance(new_q, LoraLinear) and isinstance(new_q, nn.Linear)
    assert new_q.weight is w and new_q.bias is b          # same Parameter objects, no copy
    assert torch.count_nonzero(new_q.lora.lora_A) > 0
    assert torch.count_nonzero(new_q.lora.lora_B) == 0
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)
    # base keys unchanged; LoRA keys added in the original naming
    keys = set(model.state_dict())
    assert sd_keys <= keys
    assert "encoder.layers.0.self_att.self_attention.project_q.lora.lora_A" in keys
    assert "encoder.layers.1.ffn.ffn.w_in.w_0.lora.lora_B" in keys


def test_lora_forward_formula():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    lora = LoraLinear.from_linear(lin, r=3, alpha=6)
    with torch.no_grad():
        lora.lora.lora_B.normal_()
    x = torch.randn(2, 4, 6)
    A, B = lora.lora.lora_A, lora.lora.lora_B
    expected = lin(x) + x @ A.T @ B.T * (6 / 3)
    torch.testing.assert_close(lora(x), expected)


def test_only_lora_is_trainable_and_count_matches_formula():
    model = _toy()
    cfg = LoraConfig(r=4, alpha=8, target_modules=["project_q", "project_v", "w_out"])
    apply_lora(model, cfg)
    wrapped = list(lora_modules(model))
    assert len(wrapped) == 2 * 3
    expected = sum(cfg.r * (m.in_features + m.out_features) for _, m in wrapped)
    assert count_parameters(model)["trainable"] == expected
    assert sum(p.numel() for p in trainable_parameters(model)) == expected
    # d=16, ff=24, kv=8: q 4*(16+16), v 4*(16+8), w_out 4*(24+16), two layers
    assert expected == 2 * (4 * 32 + 4 * 24 + 4 * 40)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".lora.lora_A", ".lora.lora_B")) for n in names)


def test_only_lora_tensors_get_grads():
    model = apply_lora(_toy(), LoraConfig(r=4, alpha=8, target_modules=ALL7))
    _randomize_lora(model)  # B != 0 so A gets a non-zero gradient too
    model(_ids()).sum().backward()
    for name, p in model.named_parameters():
        if ".lora." in name:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


def test_bad_targets_are_named():
    with pytest.raises(LoraError, match=r"\['q_proj_typo', 'mlp'\] match no linear layer.*project_q"):
        apply_lora(_toy(), LoraConfig(target_modules=["project_q", "q_proj_typo", "mlp"]))
    with pytest.raises(LoraError, match=r"not nn.Linear.*input_embedding \(Embedding\)"):
        apply_lora(_toy(), LoraConfig(target_modules=["input_embedding"]))
    model = apply_lora(_toy(), LoraConfig(target_modules=["project_q"]))
    with pytest.raises(LoraError, match="already has 2 LoRA layers"):
        apply_lora(model, LoraConfig(target_modules=["project_v"]))
    cfg = LoraConfig(r=4)
    cfg.r = 0  # mutated after construction
    with pytest.raises(LoraError, match="r must be > 0, got 0"):
        apply_lora(_toy(), cfg)
    with pytest.raises(LoraError, match="no LoRA layers"):
        merge_lora(_toy())


def test_meta_device_then_materialise():
    with torch.device("meta"):
        model = _Toy()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["project_q", "w_out"]))
    assert model.encoder.layers[0].ffn.ffn.w_out.lora.lora_B.device.type == "meta"
    model.to_empty(device="cpu")
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora.lora_B.fill_(float("nan"))  # to_empty leaves garbage
    reset_lora_parameters(model)
    for _, m in lora_modules(model):
        assert torch.count_nonzero(m.lora.lora_B) == 0 and torch.isfinite(m.lora.lora_A).all()
        assert m.lora.lora_A.requires_grad and not m.weight.requires_grad


def test_multi_part_target_names():
    model = apply_lora(_toy(), LoraConfig(target_modules=["self_attention.project_q", "layers.1.ffn.ffn.w_out"]))
    names = [n for n, _ in lora_modules(model)]
    assert names == [
        "encoder.layers.0.self_att.self_attention.project_q",
        "encoder.layers.1.self_att.self_attention.project_q",
        "encoder.layers.1.ffn.ffn.w_out",
    ]


def test_get_lora_config_reconstructs():
    model = apply_lora(_toy(), LoraConfig(r=4, alpha=8, target_modules=["w_out", "project_q"]))
    cfg = get_lora_config(model)
    assert cfg == LoraConfig(r=4, alpha=8, target_modules=["project_q", "w_out"])
    assert get_lora_config(_toy()) is None


# ---------------------------------------------------------------------------------------------
# Merge / unmerge
# ---------------------------------------------------------------------------------------------

def test_merge_after_training_matches_unmerged_and_unmerge_restores():
    model = _toy()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=ALL7))
    ids = _ids()
    _train_steps(model, ids, steps=3)
    assert all(torch.count_nonzero(m.lora.lora_B) > 0 for _, m in lora_modules(model))
    model.eval()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        assert all(m.merged for _, m in lora_modules(model))
        merged = model(ids)
        w_merged = model.encoder.layers[0].self_att.self_attention.project_q.weight.clone()
        merge_lora(model)  # idempotent
        torch.testing.assert_close(model.encoder.layers[0].self_att.self_attention.project_q.weight, w_merged)
        unmerge_lora(model)
        again = model(ids)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert (again - unmerged).abs().max().item() <= 1e-5
    # base weights restored to fp32 rounding (and they really did change while merged)
    q = "encoder.layers.0.self_att.self_attention.project_q.weight"
    assert (w_merged - base[q]).abs().max() > 1e-4
    for k, v in base.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_merge_bf16_base_in_fp32_math():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=False).to(torch.bfloat16)
    w0 = lin.weight.detach().clone()
    lora = LoraLinear.from_linear(lin, r=4, alpha=8, adapter_dtype=torch.float32)
    with torch.no_grad():
        lora.lora.lora_B.normal_(std=0.02)
    delta = lora.lora.delta_weight()
    lora.merge()
    assert lora.weight.dtype == torch.bfloat16
    torch.testing.assert_close(lora.weight, (w0.float() + delta).to(torch.bfloat16), rtol=0, atol=0)
    lora.unmerge()
    # one bf16 rounding each way (unit roundoff 2^-8): not exact in bf16, but within the two roundings
    err = (lora.weight.float() - w0.float()).abs()
    assert (err <= (w0.float().abs() + (w0.float() + delta).abs()) * 2 ** -8 + 1e-9).all()


def test_unload_lora_gives_plain_model():
    ids = _ids()
    model = apply_lora(_toy(), LoraConfig(r=4, alpha=8, target_modules=ALL7))
    _randomize_lora(model)
    with torch.no_grad():
        with_lora = model(ids)
    plain_keys = set(_toy().state_dict())
    unload_lora(model)  # merge, then drop the branches
    assert not list(lora_modules(model))
    assert type(model.encoder.layers[0].ffn.ffn.w_out) is nn.Linear
    assert set(model.state_dict()) == plain_keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids), with_lora, rtol=1e-5, atol=1e-5)
    # merge=False: the base model comes back
    base = _toy()
    model = apply_lora(_toy(), LoraConfig(r=4, alpha=8, target_modules=ALL7))
    _randomize_lora(model)
    merge_lora(model)
    unload_lora(model, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# dtype / activation checkpointing
# ---------------------------------------------------------------------------------------------

def test_bf16_base_with_fp32_adapters():
    model = _toy().to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=ALL7))
    m = model.encoder.layers[0].self_att.self_attention.project_q
    assert m.weight.dtype == torch.bfloat16 and m.lora.lora_A.dtype == torch.float32
    _randomize_lora(model)
    out = model(_ids())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert m.lora.lora_A.grad.dtype == torch.float32 and torch.count_nonzero(m.lora.lora_A.grad) > 0
    assert m.weight.grad is None
    # adapter_dtype=None keeps the base dtype
    m2 = apply_lora(_toy().to(torch.bfloat16), LoraConfig(target_modules=["w_0"]), adapter_dtype=None)
    assert m2.encoder.layers[0].ffn.ffn.w_in.w_0.lora.lora_A.dtype == torch.bfloat16


def test_activation_checkpointing_same_grads_toy():
    grads = []
    for ckpt in (False, True):
        model = apply_lora(_toy(), LoraConfig(r=4, alpha=8, target_modules=ALL7))
        _randomize_lora(model)
        model.checkpointing = ckpt
        model(_ids()).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


# ---------------------------------------------------------------------------------------------
# Original-format LoRA state dicts
# ---------------------------------------------------------------------------------------------

def test_lora_state_dict_round_trip(tmp_path):
    cfg = LoraConfig(r=4, alpha=8, target_modules=["project_q", "project_v", "w_0"])
    src = apply_lora(_toy(), cfg)
    _randomize_lora(src)
    sd = lora_state_dict(src)
    assert list(sd)[:2] == [
        "encoder.layers.0.self_att.self_attention.project_q.lora.lora_A",
        "encoder.layers.0.self_att.self_attention.project_q.lora.lora_B",
    ]
    assert len(sd) == 2 * 3 * 2 and all(k.endswith((".lora.lora_A", ".lora.lora_B")) for k in sd)
    assert sd["encoder.layers.1.ffn.ffn.w_in.w_0.lora.lora_A"].shape == (4, 16)
    assert sd["encoder.layers.1.ffn.ffn.w_in.w_0.lora.lora_B"].shape == (24, 4)
    # it is exactly the LoRA part of the model's own state_dict
    full = src.state_dict()
    assert all(torch.equal(full[k], v) for k, v in sd.items())

    dst = apply_lora(_toy(), cfg)  # same base (seed 0), different random A
    ids = _ids()
    assert not torch.allclose(dst(ids), src(ids))
    load_lora_state_dict(dst, sd)
    torch.testing.assert_close(dst(ids), src(ids), rtol=0, atol=0)

    # the .pt file, as the original tools write / read it
    path = tmp_path / "fm9g_live_checkpoint-10.pt"
    save_lora_checkpoint(src, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(sd)
    dst2 = apply_lora(_toy(), cfg)
    load_lora_checkpoint(dst2, path)
    torch.testing.assert_close(dst2(ids), src(ids), rtol=0, atol=0)


def test_load_lora_state_dict_errors():
    cfg = LoraConfig(r=4, alpha=8, target_modules=["project_q", "project_v"])
    sd = lora_state_dict(apply_lora(_toy(), cfg))
    # a checkpoint of another model size: every tensor's shape is off
    other = lora_state_dict(apply_lora(_toy(d=32), cfg))
    model = apply_lora(_toy(), cfg)
    with pytest.raises(LoraError, match=r"8 with another shape in LoRA state dict: encoder.layers.0.self_att.self_attention"
                                        r".project_q.lora.lora_A: \(4, 32\) vs expected \(4, 16\)"):
        load_lora_state_dict(model, other)
    # other rank
    with pytest.raises(LoraError, match=r"\(8, 16\) vs expected \(4, 16\)"):
        load_lora_state_dict(model, lora_state_dict(apply_lora(_toy(), LoraConfig(r=8, target_modules=["project_q", "project_v"]))))
    # missing / unexpected
    partial = {k: v for k, v in sd.items() if "project_v" not in k}
    with pytest.raises(LoraError, match=r"4 missing keys: encoder.layers.0.self_att.self_attention.project_v.lora.lora_A"):
        load_lora_state_dict(model, partial)
    extra = dict(sd, **{"encoder.layers.0.ffn.ffn.w_out.lora.lora_A": torch.zeros(4, 24)})
    with pytest.raises(LoraError, match=r"1 unexpected keys: encoder.layers.0.ffn.ffn.w_out.lora.lora_A"):
        load_lora_state_dict(model, extra)
    load_lora_state_dict(model, partial, strict=False)  # allowed when not strict
    # DDP / compile prefixes are ignored
    load_lora_state_dict(model, {"module." + k: v for k, v in sd.items()})
    merge_lora(model)
    with pytest.raises(LoraError, match="unmerge_lora"):
        load_lora_state_dict(model, sd)


# ---------------------------------------------------------------------------------------------
# PEFT adapters (file format, independent of transformers)
# ---------------------------------------------------------------------------------------------

def test_peft_adapter_files(tmp_path):
    from safetensors.torch import load_file

    model = apply_lora(_toy(), LoraConfig(r=4, alpha=8, target_modules=["project_q", "w_0", "w_out"]))
    _randomize_lora(model)
    save_peft_adapter(model, tmp_path / "ad", base_model_name_or_path="hf_out")
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"
    assert (conf["r"], conf["lora_alpha"], conf["lora_dropout"]) == (4, 8, 0.0)
    assert conf["target_modules"] == ["q_proj", "gate_proj", "down_proj"]
    assert conf["base_model_name_or_path"] == "hf_out"
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    torch.testing.assert_close(a, model.encoder.layers[1].self_att.self_attention.project_q.lora.lora_A.detach())
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (16, 4)
    assert len(tensors) == 2 * 3 * 2

    back = load_peft_adapter(_toy(), tmp_path / "ad")
    ids = _ids()
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


def test_peft_native_muP_scaling(tmp_path):
    """With muP residual scaling folded into o_proj / down_proj, their LoRA B carries the factor."""
    from safetensors.torch import load_file

    class Cfg:
        scale_depth, num_layers, scale, scale_width = 1.4, 2, True, 10.0

    model = apply_lora(_toy(), LoraConfig(r=4, alpha=8, target_modules=["project_q", "attention_out", "w_out"]))
    model.config = Cfg()
    _randomize_lora(model)
    save_peft_adapter(model, tmp_path / "native")
    save_peft_adapter(model, tmp_path / "fm9g", format="fm9g")
    nat = load_file(tmp_path / "native" / "adapter_model.safetensors")
    raw = load_file(tmp_path / "fm9g" / "adapter_model.safetensors")
    c = 1.4 / math.sqrt(2)
    for key in raw:
        factor = c if ("o_proj.lora_B" in key or "down_proj.lora_B" in key) else 1.0
        torch.testing.assert_close(nat[key], raw[key] * factor, msg=key)
    fresh = _toy()
    fresh.config = Cfg()
    load_peft_adapter(fresh, tmp_path / "native")
    for k, v in lora_state_dict(model).items():
        torch.testing.assert_close(lora_state_dict(fresh)[k], v, msg=k)


def test_peft_import_errors(tmp_path):
    model = apply_lora(_toy(), LoraConfig(r=4, alpha=8, target_modules=["project_q"]))
    save_peft_adapter(model, tmp_path / "ad")
    conf_path = tmp_path / "ad" / "adapter_config.json"
    conf = json.loads(conf_path.read_text())

    with pytest.raises(LoraError, match="no adapter_config.json"):
        load_peft_adapter(_toy(), tmp_path)
    conf_path.write_text(json.dumps(dict(conf, use_dora=True, bias="all")))
    with pytest.raises(LoraError, match=r"does not support: use_dora=True, bias='all'"):
        load_peft_adapter(_toy(), tmp_path / "ad")
    conf_path.write_text(json.dumps(dict(conf, target_modules=".*q_proj")))
    with pytest.raises(LoraError, match="regular expression"):
        load_peft_adapter(_toy(), tmp_path / "ad")
    conf_path.write_text(json.dumps(dict(conf, peft_type="IA3")))
    with pytest.raises(LoraError, match="only LORA"):
        load_peft_adapter(_toy(), tmp_path / "ad")
    conf_path.write_text(json.dumps(conf))
    # a model with a different width: shape mismatch named
    with pytest.raises(LoraError, match="with another shape in"):
        load_peft_adapter(_toy(d=32), tmp_path / "ad")
    # rsLoRA: alpha/sqrt(r) scaling reproduced
    conf_path.write_text(json.dumps(dict(conf, use_rslora=True)))
    m = load_peft_adapter(_toy(), tmp_path / "ad")
    assert math.isclose(m.encoder.layers[0].self_att.self_attention.project_q.lora.scaling, 8 / math.sqrt(4))


# ---------------------------------------------------------------------------------------------
# FM9GModel, and parity with transformers + peft
# ---------------------------------------------------------------------------------------------

def _fm9g_tiny(seed: int = 0, **overrides):
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel

    torch.manual_seed(seed)
    return FM9GModel(FM9GConfig.from_name("tiny", **overrides)).eval()


def _packed_batch(T: int = 24):
    ids = _ids(seed=5, B=1, T=T, vocab=99)
    cu = torch.tensor([0, 10, T], dtype=torch.int32)
    labels = ids.roll(-1, 1)
    labels[0, [9, T - 1]] = -100
    return ids, cu, labels


def test_fm9g_model_lora_lifecycle():
    """B = 0 changes nothing; training touches only LoRA; merged == unmerged; unmerge restores."""
    model = _fm9g_tiny(qkv_bias=True, tie_lm_head=False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids, cu, labels = _packed_batch()
    with torch.no_grad():
        ref = model(ids, cu_seqlens=cu).logits
    cfg = LoraConfig.from_name("fm9g-7b", r=4)
    apply_lora(model, cfg)
    assert len(list(lora_modules(model))) == 7 * model.config.num_layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cu_seqlens=cu).logits, ref, rtol=0, atol=0)
    c = model.config
    q_out, kv_out = c.num_heads * c.dim_head, c.num_kv_heads * c.dim_head
    per_layer = cfg.r * ((c.dim_model + q_out) + 2 * (c.dim_model + kv_out) + (q_out + c.dim_model)
                         + 2 * (c.dim_model + c.dim_ff) + (c.dim_ff + c.dim_model))
    assert count_parameters(model)["trainable"] == c.num_layers * per_layer

    model.train()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        out = model(ids, cu_seqlens=cu, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (".lora." in name), name
        opt.step()
    model.eval()
    with torch.no_grad():
        unmerged = model(ids, cu_seqlens=cu).logits
        assert (unmerged - ref).abs().max() > 1e-3  # the adapter does something
        merge_lora(model)
        merged = model(ids, cu_seqlens=cu).logits
        unmerge_lora(model)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    sd = model.state_dict()
    for k, v in base.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_fm9g_activation_checkpointing_same_grads():
    ids, cu, labels = _packed_batch()
    grads = []
    for ckpt in (False, True):
        model = apply_lora(_fm9g_tiny(), LoraConfig(r=4, alpha=8, target_modules=ALL7)).train()
        _randomize_lora(model)
        model.set_activation_checkpointing(ckpt)
        model(ids, cu_seqlens=cu, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * 7 * 2
    for k in grads[0]:
        assert torch.count_nonzero(grads[0][k]) > 0, k
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_fm9g_lm_head_target_is_refused():
    with pytest.raises(LoraError, match="lm_head.weight directly"):
        apply_lora(_fm9g_tiny(tie_lm_head=False), LoraConfig(target_modules=["project_q", "lm_head"]))


def _hf_base(kind: str, seed: int = 0):
    """A tiny Llama (GQA, tied) or Qwen2 (q/k/v bias, untied) and the same weights in FM9GModel."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from fm9g.convert.keys import convert_state_dict

    qwen = kind == "qwen2"
    common = dict(vocab_size=99, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=not qwen, rope_theta=10000.0)
    torch.manual_seed(seed)
    if qwen:
        hf = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
    with torch.no_grad():  # HF's init (std 0.02) is nearly linear; make the test sensitive
        for p in hf.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.eval()
    fm = _fm9g_tiny(scale=False, scale_depth=-1.0, qkv_bias=qwen, tie_lm_head=not qwen)
    fm.load_state_dict(convert_state_dict(hf.state_dict(), to="bmt", config=fm.config))
    return hf, fm


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_peft_export_runs_on_transformers(kind, tmp_path):
    from peft import PeftModel

    hf, fm = _hf_base(kind)
    ids = _ids(seed=6, B=2, T=12, vocab=99)
    with torch.no_grad():
        torch.testing.assert_close(fm(ids).logits, _hf_logits(hf, ids), rtol=1e-4, atol=1e-4)  # same base
        base_logits = fm(ids).logits
    apply_lora(fm, LoraConfig(r=4, alpha=8, target_modules=ALL7))
    _randomize_lora(fm, std=0.2)
    save_peft_adapter(fm, tmp_path / "adapter", base_model_name_or_path="tiny-hf")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = fm(ids).logits
    assert (ours - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(_hf_logits(peft_model, ids), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, targets, rslora", [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    ("qwen2", ["q_proj", "v_proj", "down_proj"], True),
])
def test_peft_made_adapter_imports(kind, targets, rslora, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf, fm = _hf_base(kind)
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                   task_type="CAUSAL_LM", use_rslora=rslora))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    load_peft_adapter(fm, tmp_path / "adapter")
    mapped = {HF_TO_ORIGINAL_TARGET[t] for t in targets}
    assert get_lora_config(fm).target_modules == [t for t in ORIGINAL_TARGETS if t in mapped]
    ids = _ids(seed=7, B=2, T=12, vocab=99)
    with torch.no_grad():
        ours = fm(ids).logits
        with peft_model.disable_adapter():
            assert (_hf_logits(peft_model, ids) - ours).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, _hf_logits(peft_model, ids), rtol=1e-4, atol=1e-4)
    # and back out again: our export of the imported adapter reproduces peft's tensors
    from safetensors.torch import load_file

    save_peft_adapter(fm, tmp_path / "again")
    theirs = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert theirs.keys() == again.keys()
    for k in theirs:
        torch.testing.assert_close(again[k], theirs[k], msg=k)


def test_peft_export_muP_model_on_native_llama(tmp_path):
    """A muP model (tiny = 4B-shaped) exported natively folds scale_emb, the residual factor and
    1/scale_width into the weights; the PEFT adapter must fold the residual factor into B too."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from fm9g.convert.keys import convert_state_dict

    fm = _fm9g_tiny()
    c = fm.config
    assert c.scale and c.scale_depth > 0 and c.tie_lm_head
    with torch.no_grad():
        for p in fm.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    sd = convert_state_dict(fm.state_dict(), to="hf", config=c)
    emb = sd["model.embed_tokens.weight"]
    sd = {k: v * c.residual_scale if k.endswith(("o_proj.weight", "down_proj.weight")) else v for k, v in sd.items()}
    sd["model.embed_tokens.weight"] = emb * c.scale_emb
    sd["lm_head.weight"] = emb / c.scale_width
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=99, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
        tie_word_embeddings=False, rope_theta=10000.0)).eval()
    hf.load_state_dict(sd, strict=True)
    ids = _ids(seed=8, B=1, T=12, vocab=99)
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(hf, ids), fm(ids).logits, rtol=1e-4, atol=1e-4)
    apply_lora(fm, LoraConfig.from_name("fm9g-4b", r=4))
    _randomize_lora(fm, std=0.2)
    save_peft_adapter(fm, tmp_path / "adapter")  # format="native"
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(peft_model, ids), fm(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("format", ["native", "fm9g"])
def test_peft_adapter_on_bmt_to_hf_export(format, tmp_path):
    """The user flow: export the base with bmt_to_hf, the LoRA with save_peft_adapter, load both
    with transformers + peft; the muP tiny model exercises the native folding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fm9g.convert.hf import bmt_to_hf

    fm = _fm9g_tiny()
    with torch.no_grad():
        for p in fm.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    torch.save(fm.state_dict(), tmp_path / "base.pt")
    bmt_to_hf(tmp_path / "base.pt", tmp_path / "hf", config=fm.config, format=format, dtype=torch.float32)
    apply_lora(fm, LoraConfig.from_name("fm9g-4b", r=4))
    _randomize_lora(fm, std=0.2)
    save_peft_adapter(fm, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "hf"), format=format)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, trust_remote_code=format == "fm9g")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = _ids(seed=9, B=1, T=12, vocab=99)
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(peft_model, ids), fm(ids).logits, rtol=1e-4, atol=1e-4)
    # and the adapter comes back into a fresh fm9g model unchanged
    back = _fm9g_tiny()
    back.load_state_dict(torch.load(tmp_path / "base.pt", weights_only=True))
    load_peft_adapter(back, tmp_path / "adapter", format=format)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, fm(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A real pretrained model: SmolLM2-135M-Instruct (Llama, GQA 9/3, tied embeddings)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_hf(smollm2_model):
    """SmolLM2 as transformers' LlamaForCausalLM (fp32), the shared session model."""
    return smollm2_model


@pytest.mark.slow
def test_smollm2_lora_adapter_runs_in_peft(smol_hf, tmp_path):
    from peft import PeftModel

    from fm9g.convert.hf import fm9g_config_from_hf
    from fm9g.convert.keys import convert_state_dict
    from fm9g.models.fm9g import FM9GModel

    hf_cfg = smol_hf.config.to_dict()
    hf_cfg.pop("quantization_config", None)
    cfg = fm9g_config_from_hf(hf_cfg)
    with torch.device("meta"):
        fm = FM9GModel(cfg)
    fm.load_state_dict(convert_state_dict(smol_hf.state_dict(), to="bmt", config=cfg), assign=True)
    fm.eval()
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 2, 198, 504, 3575]])
    with torch.no_grad():
        base = fm(ids).logits
        torch.testing.assert_close(base, smol_hf(input_ids=ids).logits, rtol=1e-4, atol=1e-3)

    apply_lora(fm, LoraConfig.from_name("fm9g-4b", r=8))  # all 7 projections
    _randomize_lora(fm, std=0.02)
    save_peft_adapter(fm, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(smol_hf, tmp_path / "adapter").eval()
    try:
        with torch.no_grad():
            ours = fm(ids).logits
            theirs = peft_model(input_ids=ids).logits
    finally:
        peft_model.unload()  # the fixture may be the shared session model: put its layers back
    assert not any("lora" in n for n, _ in smol_hf.named_parameters())
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# GPU (run on the H100 with `pytest -m gpu`; the CPU tests above cover the same logic in fp32)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_bf16_lora_step_checkpointing_and_merge():
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel

    dev = torch.device("cuda")
    ids = torch.randint(0, 99, (1, 256), generator=torch.Generator().manual_seed(0)).to(dev)
    cu = torch.tensor([0, 64, 128, 192, 256], dtype=torch.int32, device=dev)
    labels = ids.roll(-1, 1)
    grads, losses = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        try:
            with dev:
                model = FM9GModel(FM9GConfig.from_name("tiny"))
        finally:
            torch.set_default_dtype(torch.float32)
        apply_lora(model, LoraConfig.from_name("fm9g-7b", r=8))
        _randomize_lora(model)
        assert {p.dtype for p in trainable_parameters(model)} == {torch.float32}
        model.set_activation_checkpointing(ckpt)
        out = model(ids, cu_seqlens=cu, labels=labels)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for n, p in model.named_parameters() if ".lora." not in n)
    assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-2, atol=1e-3, msg=k)
    model.eval()
    with torch.no_grad():
        unmerged = model(ids, cu_seqlens=cu).logits.float()
        merge_lora(model)
        merged = model(ids, cu_seqlens=cu).logits.float()
    # bf16 weights: the merged weight is rounded to bf16, so agreement is at bf16 precision
    assert (merged - unmerged).abs().max().item() < 0.1 * unmerged.abs().max().item()


def test_lora_config_resolves_hf_target_names_without_the_conversion_package():
    """In a fresh interpreter LoraConfig maps PEFT's target names to the original ones, and
    fm9g.convert was never imported for that."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from fm9g.models.lora_config import LoraConfig\n"
             "names = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']\n"
             "print(LoraConfig(target_modules=names).target_modules)\n"
             "print(sorted(m for m in sys.modules if m == 'fm9g.convert' or m.startswith('fm9g.convert.')))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    targets, convert = out.stdout.strip().splitlines()
    assert targets == str(["project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out"])
    assert convert == "[]"


def test_hf_target_names_agree_with_the_name_table():
    """LoraConfig's Hugging Face target names are the leaf pairs of the conversion name table."""
    from fm9g.convert.keys import NAME_TABLE
    from fm9g.models.lora_config import HF_TARGET_NAMES, ORIGINAL_TARGETS

    leaf = lambda name: name.rsplit(".", 1)[-1]  # noqa: E731
    table = {leaf(row.hf): leaf(row.bmt) for row in NAME_TABLE if leaf(row.bmt) in ORIGINAL_TARGETS}
    assert HF_TARGET_NAMES == table and HF_TO_ORIGINAL_TARGET == table


def test_lora_tensor_names_are_recognised_in_one_place():
    from fm9g.models.lora import is_lora_name, split_lora_name

    name = "encoder.layers.3.ffn.ffn.w_in.w_0.lora.lora_B"
    assert is_lora_name(name) and split_lora_name(name) == ("encoder.layers.3.ffn.ffn.w_in.w_0", "lora_B")
    assert split_lora_name("module." + name) == split_lora_name(name)
    assert not is_lora_name("encoder.layers.3.ffn.ffn.w_in.w_0.weight") and split_lora_name("lm_head.weight") is None
