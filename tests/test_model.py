"""FM9GModel: parity with transformers, muP formulas, packing, checkpointing, chunked loss, init."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fm9g.convert.keys import convert_state_dict
from fm9g.models.config import FM9GConfig
from fm9g.models.fm9g import FM9GModel, chunked_cross_entropy



pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights ≠ 1, biases ≠ 0) so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def _hf_pair(arch: str, *, tied: bool, kv_heads: int, bias: bool) -> tuple[torch.nn.Module, FM9GModel]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                  rope_theta=5000.0, max_position_embeddings=128, tie_word_embeddings=tied)
    if arch == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**common))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**common))
    hf.config._attn_implementation = "eager"
    _randomise(hf)
    hf.eval()
    cfg = FM9GConfig(vocab_size=99, dim_model=64, dim_ff=96, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                     dim_head=16, eps=1e-6, base=5000.0, max_length=128, tie_lm_head=tied, qkv_bias=bias,
                     scale=False, scale_depth=-1.0, dtype="fp32", use_checkpoint=False, attn_impl="sdpa")
    model = FM9GModel(cfg).eval()
    sd = convert_state_dict(hf.state_dict(), to="bmt", config=cfg)
    model.load_state_dict(sd, strict=True)
    return hf, model


@pytest.mark.parametrize(
    "arch,tied,kv_heads,bias",
    [("llama", True, 4, False), ("llama", False, 4, False), ("llama", True, 2, False),
     ("llama", False, 2, False), ("qwen2", False, 2, True), ("qwen2", True, 4, True)],
)
def test_logits_match_transformers(arch: str, tied: bool, kv_heads: int, bias: bool) -> None:
    hf, model = _hf_pair(arch, tied=tied, kv_heads=kv_heads, bias=bias)
    ids = torch.randint(0, 99, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = model(ids).logits
    assert got.shape == ref.shape == (2, 17, 99)
    assert (got - ref).abs().max().item() <= 1e-5
    # and back: our state dict converts to HF names HF accepts strictly
    back = convert_state_dict(model.state_dict(), to="hf", config=model.config)
    missing, unexpected = hf.load_state_dict(back, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}


def _mup_config() -> FM9GConfig:
    return FM9GConfig(vocab_size=50, dim_model=32, dim_ff=48, num_layers=3, num_heads=4, num_kv_heads=2,
                      dim_head=8, eps=1e-5, base=10000.0, tie_lm_head=True, qkv_bias=True, scale=True,
                      scale_emb=12.0, scale_depth=1.4, dim_model_base=8, init_std=0.1, dtype="fp32",
                      use_checkpoint=False, attn_impl="sdpa")


def _reference_forward(sd: dict[str, torch.Tensor], cfg: FM9GConfig, ids: torch.Tensor) -> torch.Tensor:
    """SPEC §1.2 written with plain torch ops from the raw state dict (no model code)."""
    T = ids.shape[1]
    h_heads, kv_heads, dh, L = cfg.num_heads, cfg.num_kv_heads, cfg.dim_head, cfg.num_layers

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps))

    pos = torch.arange(T, dtype=torch.float64)
    inv = torch.tensor([1.0 / cfg.base ** (2 * i / dh) for i in range(dh // 2)], dtype=torch.float64)
    ang = torch.outer(pos, inv)  # (T, dh/2)
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()

    def rope(x: torch.Tensor) -> torch.Tensor:  # (T, heads, dh), rotate-half convention
        a, b = x[..., : dh // 2], x[..., dh // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    alpha = 1.4 / math.sqrt(L)  # formula 2: residual branches × scale_depth/√L
    h = sd["input_embedding.weight"][ids[0]] * 12.0  # formula 1: embedding × scale_emb
    causal = torch.ones(T, T).tril().bool()
    for i in range(L):
        p = f"encoder.layers.{i}."
        x = norm(h, sd[p + "self_att.layernorm_before_attention.weight"])
        att = p + "self_att.self_attention."
        q = (x @ sd[att + "project_q.weight"].T + sd[att + "project_q.bias"]).view(T, h_heads, dh)
        k = (x @ sd[att + "project_k.weight"].T + sd[att + "project_k.bias"]).view(T, kv_heads, dh)
        v = (x @ sd[att + "project_v.weight"].T + sd[att + "project_v.bias"]).view(T, kv_heads, dh)
        q, k = rope(q), rope(k)
        outs = []
        for head in range(h_heads):
            g = head // (h_heads // kv_heads)
            scores = (q[:, head] @ k[:, g].T) / math.sqrt(dh)
            scores = scores.masked_fill(~causal, float("-inf"))
            outs.append(torch.softmax(scores, -1) @ v[:, g])
        a = torch.cat(outs, dim=-1) @ sd[att + "attention_out.weight"].T
        h = h + a * alpha
        x = norm(h, sd[p + "ffn.layernorm_before_ffn.weight"])
        f = p + "ffn.ffn."
        gate = x @ sd[f + "w_in.w_0.weight"].T
        up = x @ sd[f + "w_in.w_1.weight"].T
        h = h + ((gate * torch.sigmoid(gate)) * up) @ sd[f + "w_out.weight"].T * alpha
    h = norm(h, sd["encoder.output_layernorm.weight"])
    return (h / (32 / 8)) @ sd["input_embedding.weight"].T  # formula 3: logits input ÷ d/d_base


def test_mup_matches_independent_reference() -> None:
    torch.manual_seed(0)
    cfg = _mup_config()
    model = FM9GModel(cfg).eval()
    _randomise(model, seed=3)
    ids = torch.randint(0, 50, (1, 13))
    with torch.no_grad():
        got = model(ids).logits[0]
    ref = _reference_forward({k: v.detach() for k, v in model.state_dict().items()}, cfg, ids)
    assert (got - ref).abs().max().item() <= 1e-5
    # the reference really depends on muP: switching it off changes the logits a lot
    plain = FM9GModel(FM9GConfig(**{**cfg.to_dict(), "scale": False, "scale_depth": -1.0})).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(ids).logits[0] - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_packed_documents_equal_separate_runs(impl: str) -> None:
    torch.manual_seed(0)
    cfg = FM9GConfig.from_name("tiny", attn_impl=impl)
    model = FM9GModel(cfg).eval()
    a = torch.randint(0, 99, (1, 7))
    b = torch.randint(0, 99, (1, 9))
    row = torch.cat([a, b], dim=1)  # (1, 16)
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    with torch.no_grad():
        packed = model(row, cu_seqlens=cu).logits[0]
        packed_explicit = model(row, position_ids=torch.cat([torch.arange(7), torch.arange(9)])[None],
                                cu_seqlens=cu).logits[0]
        alone_a = model(a).logits[0]
        alone_b = model(b).logits[0]
        leaky = model(row).logits[0]  # no cu_seqlens: B attends to A
    torch.testing.assert_close(packed, packed_explicit, rtol=0, atol=0)
    torch.testing.assert_close(packed[:7], alone_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[7:], alone_b, rtol=0, atol=1e-5)
    assert (leaky[7:] - alone_b).abs().max() > 1e-3  # the test can fail


def test_packed_two_rows_flattened_cu_seqlens() -> None:
    torch.manual_seed(0)
    model = FM9GModel(FM9GConfig.from_name("tiny")).eval()
    rows = torch.randint(0, 99, (2, 8))
    # row 0: docs of 3 and 5 tokens; row 1: one doc of 6 + a 2-token padding segment
    cu = torch.tensor([0, 3, 8, 14, 16], dtype=torch.int32)
    with torch.no_grad():
        packed = model(rows, cu_seqlens=cu).logits
        d1 = model(rows[1:, :6]).logits[0]
        d0 = model(rows[:1, 3:]).logits[0]
    torch.testing.assert_close(packed[1, :6], d1, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[0, 3:], d0, rtol=0, atol=1e-5)


def test_bad_cu_seqlens_rejected() -> None:
    model = FM9GModel(FM9GConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(1, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32))


def _loss_and_grads(model: FM9GModel, ids: torch.Tensor, labels: torch.Tensor, cu: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    out = model(ids, cu_seqlens=cu, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_activation_bytes(model: FM9GModel, ids: torch.Tensor, labels: torch.Tensor, cu: torch.Tensor) -> int:
    """Bytes the forward leaves for the backward (autograd's saved tensors, parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, cu_seqlens=cu, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved)


def test_activation_checkpointing_same_loss_and_grads() -> None:
    """Every layer, none, or a share of the layers recomputed: the same loss and gradients bit for
    bit; what the forward keeps for the backward falls with the share."""
    torch.manual_seed(0)
    model = FM9GModel(FM9GConfig.from_name("tiny", num_layers=4, qkv_bias=True))
    ids = torch.randint(0, 99, (2, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    cu = torch.tensor([0, 5, 12, 24], dtype=torch.int32)
    model.set_activation_checkpointing(False)
    loss0, g0 = _loss_and_grads(model, ids, labels, cu)
    kept = {}
    for share in (False, 0.5, True):
        model.set_activation_checkpointing(share)
        loss1, g1 = _loss_and_grads(model, ids, labels, cu)
        assert torch.equal(loss0, loss1), share
        assert g0.keys() == g1.keys()
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=f"{share}: {name}")
        kept[share] = _saved_activation_bytes(model, ids, labels, cu)
    assert kept[False] > kept[0.5] > kept[True], kept


@pytest.mark.parametrize("layers, share, expected", [
    (4, 0.5, [False, True, False, True]), (4, True, [True] * 4), (4, False, [False] * 4), (4, 1, [True] * 4),
    (4, 0.0, [False] * 4), (5, 0.4, [False, False, True, False, True]), (3, 0.1, [False] * 3)])
def test_a_share_of_the_layers_is_checkpointed_spread_evenly(layers, share, expected) -> None:
    from fm9g.models.fm9g import checkpointed_layers

    assert checkpointed_layers(layers, share) == expected
    assert sum(checkpointed_layers(28, 0.25)) == 7 and sum(checkpointed_layers(28, 0.3)) == 8


@pytest.mark.parametrize("bad", [1.5, -0.25, "half"])
def test_a_bad_checkpoint_share_names_the_key_and_the_choices(bad) -> None:
    from fm9g._io import ConfigError
    from fm9g.training.config import TrainConfig

    with pytest.raises(ConfigError, match="use_checkpoint"):
        TrainConfig(model="tiny", use_checkpoint=bad)
    assert TrainConfig(model="tiny", use_checkpoint="0.5").use_checkpoint == 0.5
    assert TrainConfig(model="tiny", use_checkpoint=1).use_checkpoint is True


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_plain_cross_entropy(tied: bool) -> None:
    torch.manual_seed(0)
    model = FM9GModel(FM9GConfig.from_name("tiny", tie_lm_head=tied))
    model.loss_chunk_tokens = 5  # many chunks, the last one ragged
    ids = torch.randint(0, 99, (2, 11))
    labels = torch.randint(0, 99, (2, 11))
    labels[0, :4] = -100
    labels[1, 7] = -100
    out = model(ids, labels=labels, return_logits=True)
    out.loss.backward()
    g_chunk = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    ref = F.cross_entropy(logits.float().view(-1, 99), labels.view(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits, logits.detach(), rtol=0, atol=0)
    assert int(out.num_label_tokens) == int((labels != -100).sum())
    assert out.token_loss.shape == (2, 11) and torch.all(out.token_loss[0, :4] == 0)
    per_tok = F.cross_entropy(logits.detach().float().view(-1, 99), labels.view(-1), ignore_index=-100,
                              reduction="none").view(2, 11)
    torch.testing.assert_close(out.token_loss.detach(), per_tok, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(g_chunk[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_cross_entropy_function_grads() -> None:
    torch.manual_seed(0)
    h = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, -100, 3, 3, 1, -100, 2, 5, 4])
    for chunk in (1, 3, 10, 64):
        assert torch.autograd.gradcheck(lambda h_, w_: chunked_cross_entropy(h_, w_, labels, chunk), (h, w))


def test_all_labels_ignored_gives_zero_loss() -> None:
    model = FM9GModel(FM9GConfig.from_name("tiny"))
    ids = torch.randint(0, 99, (1, 6))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and int(out.num_label_tokens) == 0
    out.loss.backward()  # still differentiable


def test_state_dict_keys_are_bmtrain_names() -> None:
    from fm9g.convert.keys import expected_bmt_keys

    for tied, bias in [(True, False), (False, True)]:
        cfg = FM9GConfig.from_name("tiny", tie_lm_head=tied, qkv_bias=bias)
        assert list(FM9GModel(cfg).state_dict()) == expected_bmt_keys(cfg)
    sd = FM9GModel(FM9GConfig.from_name("tiny", qkv_bias=True)).state_dict()
    assert sd["encoder.layers.1.self_att.self_attention.project_k.weight"].shape == (2 * 16, 64)
    assert sd["encoder.layers.0.ffn.ffn.w_in.w_0.weight"].shape == (160, 64)
    assert "lm_head.weight" not in sd


def test_init_follows_spec() -> None:
    torch.manual_seed(0)
    cfg = FM9GConfig.from_name("tiny", dim_model=256, dim_head=64, dim_ff=512, dim_model_base=16,
                               qkv_bias=True, tie_lm_head=False, vocab_size=500)
    model = FM9GModel(cfg)
    linear_std = 0.1 / math.sqrt(256 / 16)
    att = model.encoder.layers[0].self_att.self_attention
    assert abs(att.project_q.weight.std().item() - linear_std) < 0.1 * linear_std
    assert abs(model.encoder.layers[1].ffn.ffn.w_out.weight.std().item() - linear_std) < 0.1 * linear_std
    assert abs(att.project_q.bias.std().item() - linear_std) < 0.3 * linear_std
    assert abs(model.input_embedding.weight.std().item() - 0.1) < 0.01
    assert abs(model.lm_head.weight.std().item() - 0.1) < 0.01
    assert torch.all(model.encoder.output_layernorm.weight == 1)
    assert torch.all(model.encoder.layers[0].self_att.layernorm_before_attention.weight == 1)
    plain = FM9GModel(FM9GConfig.from_name("tiny", scale=False, dim_model=256, dim_head=64, dim_ff=512))
    assert abs(plain.encoder.layers[0].ffn.ffn.w_in.w_1.weight.std().item() - 0.1) < 0.01


def test_meta_device_70b() -> None:
    cfg = FM9GConfig.from_name("fm9g-70b")
    with torch.device("meta"):
        model = FM9GModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(list(model.buffers())) == 0  # rotary tables are computed per forward, never stored


def test_meta_model_materialises_and_runs() -> None:
    cfg = FM9GConfig.from_name("tiny")
    with torch.device("meta"):
        model = FM9GModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(torch.randint(0, 99, (1, 5)))
    assert torch.isfinite(out.logits).all()


def test_autocast_bf16_forward_backward_cpu() -> None:
    torch.manual_seed(0)
    model = FM9GModel(FM9GConfig.from_name("tiny"))
    ids = torch.randint(0, 99, (1, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, return_logits=True)
    out.loss.backward()
    ref = model(ids, labels=ids).loss
    assert out.logits.dtype == torch.bfloat16
    assert abs(out.loss.item() - ref.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_agree_in_model(dtype: torch.dtype) -> None:
    from fm9g.models.attention import available_backends

    torch.manual_seed(0)
    cfg = FM9GConfig.from_name("tiny", attn_impl="sdpa")
    model = FM9GModel(cfg).to(device="cuda", dtype=dtype)
    ids = torch.randint(0, 99, (2, 40), device="cuda")
    cu = torch.tensor([0, 13, 40, 41, 80], dtype=torch.int32, device="cuda")
    results = {}
    for name in ["sdpa", *[b for b in available_backends("cuda", dtype) if b != "sdpa"]]:
        model.config.attn_impl = name
        model.zero_grad(set_to_none=True)
        out = model(ids, cu_seqlens=cu, labels=ids, return_logits=True)
        out.loss.backward()
        results[name] = (out.logits.float(), model.input_embedding.weight.grad.float())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, (logits, grad) in results.items():
        assert (logits - results["sdpa"][0]).abs().max().item() < tol, name
        assert (grad - results["sdpa"][1]).abs().max().item() < tol, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_layers_do_not_recompile_for_each_packing_layout(device: str) -> None:
    """Real training packs a different document layout into every batch; with compiled layers
    that must not mean a new graph per batch (at most one recompile per layer, to go dynamic)."""
    import random

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    attn = "sdpa" if device == "cpu" else "auto"
    model = FM9GModel(FM9GConfig.from_name("tiny", attn_impl=attn)).to(device)
    backend = "eager" if device == "cpu" else "inductor"  # dynamo's guards are the same either way
    for layer in model.encoder.layers:
        layer.compile(backend=backend)
    rng = random.Random(0)
    ids = torch.randint(0, 99, (1, 96), device=device)
    graphs = []
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for _ in range(12):
            cuts = sorted(rng.sample(range(1, 96), rng.randint(1, 5)))
            cu = torch.tensor([0, *cuts, 96], dtype=torch.int32, device=device)
            model(ids, cu_seqlens=cu, labels=ids).loss.backward()
            graphs.append(counters["stats"]["unique_graphs"])
    # after a warm-up (one recompile to make lengths dynamic), new layouts reuse the graphs
    assert graphs[3] == graphs[-1], graphs
    torch._dynamo.reset()



def test_kept_logits_backward_is_the_chunked_one():
    """The backward over kept logits (CUDA's path, run here on the CPU in fp64): the gradients of
    h and W equal the recomputing, chunked backward."""
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    g = torch.rand(37, dtype=torch.float64)
    grads = []
    for keep in (False, True):
        loss = chunked_cross_entropy(h, w, labels, chunk_tokens=8, keep_logits_bytes=2**30 if keep else 0)
        grads.append((loss.detach(), *torch.autograd.grad(loss, [h, w], g)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_gpu_kept_logits_match_recomputing_them():
    """On CUDA the loss keeps its logits for the backward (when they fit ``keep_logits_bytes``,
    LOSS_KEEP_LOGITS_BYTES by default): the same loss bits, and the gradients of h and W as with
    recomputed chunks (one GEMM over all tokens instead of a sum over chunks), under bf16 autocast."""
    torch.manual_seed(0)
    h0 = torch.randn(128, 128, device="cuda")
    w0 = torch.randn(512, 128, device="cuda") * 0.05
    labels = torch.randint(0, 512, (128,), device="cuda")
    labels[::7] = -100

    def run(keep_bytes):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(h, w, labels, chunk_tokens=48, keep_logits_bytes=keep_bytes).sum()
        loss.backward()
        return loss.detach(), h.grad, w.grad

    loss0, *g0 = run(0)
    loss1, *g1 = run(2**30)
    assert torch.equal(loss0, loss1)
    for a, b in zip(g0, g1):
        # bf16 GEMMs: one over all tokens against a sum of three chunks' (each rounded to bf16) differ by
        # rounding, and an entry that cancels across chunks can differ by a few bf16 steps of the
        # gradient's scale (an H100 showed 0.0058 on entries of scale ~1; an H200 passed at atol 1e-4)
        assert ((b - a).norm() / a.norm()).item() < 1e-2
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2 * a.abs().max().item())


def test_static_layout_pads_to_a_few_shapes_and_changes_nothing() -> None:
    """The layout CUDA graphs replay: boundaries padded with empty documents to a power of two (at
    least 8), the longest document rounded up to a power of two (capped at the row); the loss and
    every gradient are the same as with the plain layout."""
    import random

    from fm9g.models.fm9g import static_layout

    cu = torch.tensor([0, 3, 8, 14, 24], dtype=torch.int32)
    padded, longest = static_layout(cu, 10, 24)
    assert padded.tolist() == [0, 3, 8, 14, 24, 24, 24, 24] and padded.dtype == torch.int32 and longest == 16
    assert static_layout(torch.tensor([0, 24], dtype=torch.int32), 24, 24)[1] == 24  # capped at the row
    nine = torch.arange(0, 81, 10, dtype=torch.int32)  # 9 boundaries -> 16
    assert static_layout(nine, 10, 80)[0].tolist() == [*range(0, 81, 10), *[80] * 7]
    rng = random.Random(0)
    shapes = set()
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, 4096), rng.randint(1, 60)))
        bounds = [0, *cuts, 4096]
        p, m = static_layout(torch.tensor(bounds, dtype=torch.int32), max(b - a for a, b in zip(bounds, bounds[1:])),
                             4096)
        assert p[: len(bounds)].tolist() == bounds and m >= max(b - a for a, b in zip(bounds, bounds[1:]))
        shapes.add((p.shape[0], m))
    assert len(shapes) <= 3 * 6, shapes  # 8/16/32/64 boundaries x a handful of lengths

    torch.manual_seed(0)
    model = FM9GModel(FM9GConfig.from_name("tiny", num_layers=2, qkv_bias=True, attn_impl="sdpa"))
    ids = torch.randint(0, 99, (2, 12))
    labels = ids.clone()
    labels[:, :2] = -100
    loss0, g0 = _loss_and_grads(model, ids, labels, cu)
    with torch.no_grad():
        logits0 = model(ids, cu_seqlens=cu).logits
    model.graphed_layers = True  # what an engine replaying the layers as CUDA graphs sets
    loss1, g1 = _loss_and_grads(model, ids, labels, cu)
    assert torch.equal(loss0, loss1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():  # without grad the layers' own forward runs (no graph per new length)
        torch.testing.assert_close(model(ids, cu_seqlens=cu).logits, logits0, rtol=0, atol=0)
