"""SampleTokenizer: label masking, windows of long text, oversize rules (SPEC §3.6)."""
from __future__ import annotations

import pytest

from fm9g.data.tokenize import IGNORE_INDEX, SampleTokenizer, TokenizedSample

BOS, EOS = 1, 2


class CharTokenizer:
    """One token per character (id = code point + 10): lengths are exact and easy to reason about."""

    bos_token_id = BOS
    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert not add_special_tokens
        return [ord(c) + 10 for c in text]


def ids(text: str) -> list[int]:
    return CharTokenizer().encode(text)


def test_mask_exactly_bos_and_input_real_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    st = SampleTokenizer(tok, 512, bos="always")
    sample = {"input": "What is the capital of France?", "output": "The capital of France is Paris."}
    (out,) = st(sample)
    inp = tok(sample["input"], add_special_tokens=False)["input_ids"]
    outp = tok(sample["output"], add_special_tokens=False)["input_ids"]
    assert out.input_ids == [tok.bos_token_id] + inp + outp
    assert out.labels == [IGNORE_INDEX] * len(inp) + outp + [tok.eos_token_id]
    assert len(out.input_ids) == len(out.labels)
    # no position is trained to predict BOS or a prompt token
    assert out.num_label_tokens == len(outp) + 1
    assert st.stats["emitted"] == 1


def test_output_ending_in_eos_gets_no_second_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    st = SampleTokenizer(tok, 512)
    eos_text = tok.convert_ids_to_tokens(tok.eos_token_id)
    (out,) = st({"input": "hi", "output": f"hello{eos_text}"})
    assert out.labels[-1] == tok.eos_token_id
    assert out.labels.count(tok.eos_token_id) == 1
    assert tok.eos_token_id not in out.input_ids


def test_pretraining_windows_reassemble_real_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = " ".join(f"word{i} is followed by more words, number {i * 7}." for i in range(300))
    stream = tok(text, add_special_tokens=False)["input_ids"]
    L = 64
    # pick a max_length whose final window keeps > 8 tokens, so the whole stream comes back
    while (len(stream) + 1) % L and (len(stream) + 1) % L <= 8:
        L += 1
    st = SampleTokenizer(tok, L, bos="always")
    windows = st({"input": "", "output": text})
    assert len(windows) > 3
    assert all(len(w) <= L for w in windows) and all(len(w) == L for w in windows[:-1])
    assert sum((w.input_ids for w in windows), []) == [tok.bos_token_id] + stream
    assert sum((w.labels for w in windows), []) == stream + [tok.eos_token_id]
    for prev, nxt in zip(windows, windows[1:]):
        assert nxt.input_ids[0] == prev.labels[-1]  # the token the last label predicts starts the next window
        assert nxt.input_ids[0] != tok.bos_token_id or prev.labels[-1] == tok.bos_token_id


@pytest.mark.parametrize("tail,kept", [(8, False), (9, True)])
def test_short_final_window_rule(tail, kept):
    L = 16
    n_tokens = 2 * L + tail - 1  # stream of 1 + n_tokens = 2 full windows + tail positions
    st = SampleTokenizer(CharTokenizer(), L)
    text = "".join(chr(65 + i % 26) for i in range(n_tokens))
    windows = st({"output": text})
    assert len(windows) == (3 if kept else 2)
    assert sum((w.input_ids for w in windows), []) == ([BOS] + ids(text))[: len(windows) * L if not kept else None]
    if kept:
        assert windows[-1].labels[-1] == EOS and len(windows[-1]) == tail
    else:
        assert st.stats["dropped_tail"] == 1 and st.stats["dropped_tail_tokens"] == tail


def test_oversize_rules_instruction_sample():
    L = 20
    sample = {"input": "prompt", "output": "o" * 44}
    inp, outp = ids("prompt"), ids("o" * 44)
    full_ids = [BOS] + inp + outp
    full_labels = [IGNORE_INDEX] * len(inp) + outp + [EOS]

    seg = SampleTokenizer(CharTokenizer(), L, oversize_rule="segment")
    windows = seg(sample)
    assert [len(w) for w in windows] == [20, 20, 11]
    assert sum((w.input_ids for w in windows), []) == full_ids
    assert sum((w.labels for w in windows), []) == full_labels
    assert windows[0].labels[: len(inp)] == [IGNORE_INDEX] * len(inp)
    assert IGNORE_INDEX not in windows[1].labels and windows[1].input_ids[0] != BOS
    assert seg.stats["segmented"] == 1

    head = SampleTokenizer(CharTokenizer(), L, oversize_rule="head")
    (w,) = head(sample)
    assert w.input_ids == full_ids[:L] and w.labels == full_labels[:L]
    assert EOS not in w.labels
    assert head.stats["truncated_head"] == 1

    drop = SampleTokenizer(CharTokenizer(), L, oversize_rule="drop")
    assert drop(sample) == []
    assert drop.stats["dropped_oversize"] == 1
    # a sample that fits is untouched by every rule
    for st in (seg, head, drop):
        (ok,) = st({"input": "p", "output": "short"})
        assert ok.labels[-1] == EOS and len(ok) == 1 + 1 + 5


def test_oversize_rules_pretraining_sample():
    L = 10
    text = "x" * 25  # stream of 26 positions
    assert len(SampleTokenizer(CharTokenizer(), L, oversize_rule="segment")({"output": text})) == 2  # tail of 6 dropped
    (h,) = SampleTokenizer(CharTokenizer(), L, oversize_rule="head")({"input": "", "output": text})
    assert h.input_ids == [BOS] + ids(text)[: L - 1] and h.labels == ids(text)[:L]
    assert SampleTokenizer(CharTokenizer(), L, oversize_rule="drop")({"output": text}) == []


def test_input_overflow_is_dropped_and_counted():
    L = 16
    st = SampleTokenizer(CharTokenizer(), L)
    assert st({"input": "i" * (L - 2), "output": "answer"}) == []
    assert st.stats["dropped_input_overflow"] == 1
    (ok,) = st({"input": "i" * (L - 3), "output": "ab"})[:1]
    assert len(ok) == L and ok.labels[-3:] == ids("ab") + [EOS]
    assert st({"input": "q", "output": ""}) == [] and st.stats["dropped_empty_output"] == 1
    assert st(None) == [] and st.stats["skipped_none"] == 1


def test_do_compact_keeps_head_and_tail_of_prompt():
    L = 300
    prompt = "".join(chr(0x4E00 + i) for i in range(400))
    st = SampleTokenizer(CharTokenizer(), L, do_compact=True)
    (w,) = st({"input": prompt, "output": "answer"})
    budget = L - 1 - 6
    kept = ids(prompt)[: budget // 2] + ids(prompt)[400 - (budget - budget // 2) :]
    assert w.input_ids == [BOS] + kept + ids("answer")
    assert w.labels[-1] == EOS and len(w) == L
    assert st.stats["compacted"] == 1
    # no room for 128 prompt tokens: the oversize rule applies instead
    st2 = SampleTokenizer(CharTokenizer(), L, do_compact=True, oversize_rule="drop")
    assert st2({"input": prompt, "output": "o" * 200}) == []


def test_batch_equals_single_and_overrides(smollm2_tokenizer):
    st = SampleTokenizer(smollm2_tokenizer, 48)
    samples = [{"input": "a question", "output": "an answer " * 20}, None, {"output": ""}, {"input": None, "output": "plain text"}]
    assert st.batch(samples) == [SampleTokenizer(smollm2_tokenizer, 48)(s) for s in samples]
    custom = SampleTokenizer(smollm2_tokenizer, 48, bos_id=7, eos_id=9, bos="always")
    (w,) = custom({"output": "hi"})
    assert w.input_ids[0] == 7 and w.labels[-1] == 9


def test_bad_arguments():
    class NoBos(CharTokenizer):
        bos_token_id = None

    with pytest.raises(ValueError, match="bos_id"):
        SampleTokenizer(NoBos(), 16, bos="always")
    with pytest.raises(ValueError, match="bos must be one of"):
        SampleTokenizer(CharTokenizer(), 16, bos="sometimes")
    SampleTokenizer(NoBos(), 16, bos_id=0, bos="always")
    # a tokenizer without BOS trains (issue 32): no BOS, labels still aligned
    (w,) = SampleTokenizer(NoBos(), 16)({"input": "ab", "output": "cd"})
    assert w.input_ids == ids("abcd") and w.labels == [IGNORE_INDEX] + ids("cd") + [EOS]
    with pytest.raises(ValueError, match="oversize_rule"):
        SampleTokenizer(CharTokenizer(), 16, oversize_rule="truncate")
    assert isinstance(SampleTokenizer(CharTokenizer(), 16)({"output": "x"})[0], TokenizedSample)
