"""FM9GModel.generate: the KV cache gives the tokens of step-by-step decoding without a cache, for
every preset shape (tiny configs), with LoRA applied and merged, for batched prompts of different
lengths, and equals transformers' generate on the exported SmolLM2."""
from __future__ import annotations

import copy

import pytest
import torch

from fm9g.models.config import FM9GConfig
from fm9g.models.fm9g import FM9GModel
from fm9g.models.generate import KVCache, left_align, select_next
from fm9g.models.lora import LoraConfig, apply_lora, merge_lora

V = 97
COMMON = dict(vocab_size=V, dim_model=64, num_layers=2, dim_head=16, dim_ff=96, max_length=256, dtype="fp32",
              init_std=0.2, use_checkpoint=False, attn_impl="sdpa")
SHAPES = {  # the preset shapes, tiny
    "mup_gqa_tied": dict(num_heads=4, num_kv_heads=2, tie_lm_head=True, qkv_bias=False, scale=True, scale_emb=12.0,
                         scale_depth=1.4, dim_model_base=16),  # fm9g-4b / 2.4b / 8b
    "mha_qkv_bias": dict(num_heads=4, num_kv_heads=4, tie_lm_head=False, qkv_bias=True, scale=False,
                         scale_depth=-1.0),  # fm9g-7b / 70b
    "gqa_untied": dict(num_heads=4, num_kv_heads=1, tie_lm_head=False, qkv_bias=False, scale=False, scale_depth=-1.0),
}


def _model(shape: str, seed: int = 0) -> FM9GModel:
    torch.manual_seed(seed)
    return FM9GModel(FM9GConfig(**COMMON, **SHAPES[shape])).eval()


def _lora(model: FM9GModel) -> FM9GModel:
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["project_q", "project_v", "w_0", "w_out"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:  # B = 0 would change nothing: make the adapter matter
                p.normal_(0.0, 0.3)
    return model.eval()


def _uncached_greedy(model: FM9GModel, prompt: list[int], steps: int) -> list[int]:
    """Re-run the whole sequence each step and take the argmax of the last position."""
    out = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(prompt):]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("lora", ["none", "applied", "merged"])
def test_cached_greedy_equals_uncached_argmax(shape, lora, one_thread):
    model = _model(shape)
    if lora != "none":
        model = _lora(model)
        if lora == "merged":
            merge_lora(model)
    prompt = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(3)).tolist()[0]
    got = model.generate(torch.tensor([prompt]), max_new_tokens=12)
    assert got.shape == (1, 19) and got[0, :7].tolist() == prompt
    assert got[0, 7:].tolist() == _uncached_greedy(model, prompt, 12)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_prompts_of_different_lengths_equal_one_by_one(side, one_thread):
    model = _lora(_model("mup_gqa_tied", seed=1))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 9, 6)]
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = torch.tensor(p), 1
    batched = model.generate(ids, max_new_tokens=10, attention_mask=mask)
    assert batched.shape == (3, T + 10) and torch.equal(batched[:, :T], ids)
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=10)[0, len(p):]
        assert batched[i, T:].tolist() == alone.tolist() == _uncached_greedy(model, p, 10), f"row {i}"


def test_eos_ends_rows_and_generation(one_thread):
    model = _model("mha_qkv_bias")
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(prompt, max_new_tokens=8)
    eos = int(free[0, 4])  # row 0's second new token becomes the end-of-sequence id
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=[eos], pad_token_id=0)
    row0 = out[0, 3:].tolist()
    assert row0[:2] == free[0, 3:5].tolist() and all(t == 0 for t in row0[2:])
    if eos not in free[1, 3:].tolist():
        assert out[1, 3:].tolist() == free[1, 3:].tolist()
    stop = model.generate(prompt[:1], max_new_tokens=8, eos_token_id=eos)
    assert stop.shape[1] == 5  # stopped once the only row ended


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]])
    draws = {int(select_next(logits, do_sample=True, temperature=1.0, top_p=0.5,
                             generator=torch.Generator().manual_seed(s))) for s in range(40)}
    assert draws == {0}  # token 0 alone reaches top_p 0.5
    draws = {int(select_next(logits, do_sample=True, temperature=1.0, top_p=0.99,
                             generator=torch.Generator().manual_seed(s))) for s in range(40)}
    assert draws == {0, 1}
    model = _model("gqa_untied")
    a = model.generate(torch.tensor([[1, 2]]), 6, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(7))
    b = model.generate(torch.tensor([[1, 2]]), 6, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        select_next(logits, do_sample=True, temperature=0.0, top_p=1.0, generator=None)


def test_helpers_and_errors():
    ids, real = left_align(torch.tensor([[7, 8, 0], [1, 2, 3]]), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert ids.tolist() == [[0, 7, 8], [1, 2, 3]] and real.tolist() == [[False, True, True], [True] * 3]
    with pytest.raises(ValueError, match="at least one real token"):
        left_align(torch.tensor([[1, 2]]), torch.tensor([[0, 0]]))
    cache = KVCache(1, 1, 2, 1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="max_positions"):
        cache.begin(torch.ones(1, 3, dtype=torch.bool))
    model = _model("gqa_untied")
    training = model.train()
    model.generate(torch.tensor([[1, 2]]), 2)
    assert training.training  # the mode is restored
    with pytest.raises(ValueError, match="batch dimension"):
        model.generate(torch.tensor([1, 2]), 2)


def test_generate_equals_transformers_on_exported_smollm2(tmp_path, smollm2_hf_dir, smollm2_tokenizer, one_thread):
    """Convert SmolLM2 to fm9g, export it back (native Llama), and compare token for token with
    transformers' generate on the export, batched prompts included."""
    from transformers import AutoModelForCausalLM

    from fm9g.convert.hf import bmt_to_hf, hf_to_bmt, load_pretrained

    hf_to_bmt(smollm2_hf_dir, tmp_path / "bmt" / "smol.pt")
    ours = load_pretrained(tmp_path / "bmt" / "smol.pt")
    bmt_to_hf(tmp_path / "bmt" / "smol.pt", tmp_path / "hf", reference_dir=smollm2_hf_dir, format="native")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = copy.deepcopy(smollm2_tokenizer)  # padding=True switches padding on in the backend: not the session's
    tok.padding_side = "left"
    prompts = ["The capital of France is", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        ref = theirs.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    got = ours.eval().generate(enc.input_ids, 16, attention_mask=enc.attention_mask, eos_token_id=eos)
    assert got.tolist() == ref.tolist()
    text = tok.decode(got[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
