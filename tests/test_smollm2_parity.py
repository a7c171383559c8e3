"""A real pretrained model: SmolLM2-135M-Instruct (Llama, GQA 9/3, tied) mapped into FM9GModel."""
from __future__ import annotations

import pytest
import torch

from fm9g.convert.keys import convert_state_dict
from fm9g.models.config import FM9GConfig
from fm9g.models.fm9g import FM9GModel

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def _config_from_hf(hf_config) -> FM9GConfig:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return FM9GConfig(
        vocab_size=hf_config.vocab_size,
        dim_model=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        dim_head=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        dim_ff=hf_config.intermediate_size,
        activate_fn=hf_config.hidden_act,
        eps=hf_config.rms_norm_eps,
        base=float(theta),
        max_length=hf_config.max_position_embeddings,
        tie_lm_head=bool(hf_config.tie_word_embeddings),
        qkv_bias=bool(getattr(hf_config, "attention_bias", False)),
        scale=False,
        scale_depth=-1.0,
        dtype="fp32",
        use_checkpoint=False,
        attn_impl="sdpa",
    )


@pytest.fixture(scope="module")
def hf_pair(smollm2_model, smollm2_tokenizer):
    """(LlamaForCausalLM, tokenizer) from the shared session fixtures."""
    return smollm2_model, smollm2_tokenizer


@pytest.fixture(scope="module")
def hf_model(hf_pair):
    return hf_pair[0]


@pytest.fixture(scope="module")
def hf_tokenizer(hf_pair):
    return hf_pair[1]


@pytest.fixture(scope="module")
def fm9g_smollm2(hf_model) -> FM9GModel:
    cfg = _config_from_hf(hf_model.config)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_lm_head) == (9, 3, True)
    model = FM9GModel(cfg).eval()
    model.load_state_dict(convert_state_dict(hf_model.state_dict(), to="bmt", config=cfg), strict=True)
    return model


def _greedy(model: FM9GModel, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding without a KV cache: re-run the whole prefix each step."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


def test_logits_match_transformers(hf_model, hf_tokenizer, fm9g_smollm2) -> None:
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf_model(input_ids=ids).logits
            got = fm9g_smollm2(ids).logits
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-4, f"{prompt!r}: max abs diff {diff}"


def test_packed_prompts_match_transformers(hf_model, hf_tokenizer, fm9g_smollm2) -> None:
    seqs = [hf_tokenizer(p).input_ids for p in PROMPTS[:3]]
    row = torch.tensor([sum(seqs, [])])
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = fm9g_smollm2(row, cu_seqlens=cu).logits[0]
        for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
            ref = hf_model(input_ids=torch.tensor([s])).logits[0]
            # packing changes matmul shapes, so fp32 rounding differs a little from the solo run
            assert (packed[a:b] - ref).abs().max().item() <= 5e-4


def test_greedy_continuation_matches(hf_model, hf_tokenizer, fm9g_smollm2) -> None:
    ids = hf_tokenizer(PROMPTS[0]).input_ids
    ours = _greedy(fm9g_smollm2, ids, 20)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                pad_token_id=hf_tokenizer.eos_token_id)[0, len(ids):].tolist()
    assert ours == ref, (hf_tokenizer.decode(ours), hf_tokenizer.decode(ref))
    assert "Paris" in hf_tokenizer.decode(ours[:4])
