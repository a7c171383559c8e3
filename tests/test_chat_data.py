"""Chat data (issue 27) and BOS (issue 32, item 4): every record format through build_index and
MixtureLoader, labels checked token by token against ``tokenizer.apply_chat_template``; train_on;
parity with serving; bad input named by file and line.

The expected labels are computed here from ``apply_chat_template`` alone (the prompt of turn k is
``apply_chat_template(m[:k], add_generation_prompt=True)``, the answer what ``m[:k+1]`` adds after
it through ``<|im_end|>``), never from fm9g's own rendering code.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import fm9g.data
from fm9g.data.chat import BUILTIN_TEMPLATES, ChatTemplateError
from fm9g.data.indexed import InvalidLineError, build_index
from fm9g.data.mixture import MixtureLoader
from fm9g.data.parity import check_chat_parity
from fm9g.data.tokenize import SampleTokenizer

# Qwen2-Instruct's ChatML: a default system prompt when the dialogue has none; its tokenizer has no BOS
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DIALOGUE = [
    {"role": "user", "content": "Hello! Can you help me with Atlantis?"},
    {"role": "assistant", "content": "Of course. What would you like to know?"},
    {"role": "user", "content": "What is the capital of Atlantis?"},
    {"role": "assistant", "content": "The capital of Atlantis is Poseidonia."},
    {"role": "user", "content": "Who founded it?"},
    {"role": "assistant", "content": "Atlantis was founded by the sea king Atlas."},
]
# one dialogue per format; each as the messages apply_chat_template gets
RECORDS = {
    "messages": ({"messages": DIALOGUE}, DIALOGUE),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Answer briefly."}, {"from": "human", "value": "Hi?"},
                                    {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "2+2?"},
                                    {"from": "gpt", "value": "4"}]},
                 [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]),
    "alpaca": ({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
               [{"role": "user", "content": "Translate to French.\n\nGood morning"},
                {"role": "assistant", "content": "Bonjour"}]),
    "io": ({"input": "九格是什么？", "output": "九格是一个大语言模型。"},
           [{"role": "user", "content": "九格是什么？"}, {"role": "assistant", "content": "九格是一个大语言模型。"}]),
}


@pytest.fixture(scope="module")
def qwen2_style(smollm2_tokenizer):
    """SmolLM2's vocabulary with Qwen2's habits: no BOS, Qwen2's ChatML template, EOS <|im_end|>."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = QWEN2_TEMPLATE
    tok.bos_token = None
    assert tok.bos_token_id is None and tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    return tok


@pytest.fixture(params=["smollm2", "qwen2"])
def tok(request, smollm2_tokenizer, qwen2_style):
    return smollm2_tokenizer if request.param == "smollm2" else qwen2_style


def chat_ids(tok, messages, **kw) -> list[int]:
    if not messages:
        return []
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def expected(tok, messages, train_on="assistant") -> tuple[list[int], list[int]]:
    """(input_ids, labels) the record must train with, from apply_chat_template alone."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    full = chat_ids(tok, messages)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    trained: set[int] = set()
    for k in turns:
        prompt = chat_ids(tok, messages[:k], add_generation_prompt=True)
        answer = chat_ids(tok, messages[: k + 1])[len(prompt):]
        answer = answer[: answer.index(end) + 1]
        assert full[len(prompt): len(prompt) + len(answer)] == answer
        trained |= set(range(len(prompt), len(prompt) + len(answer)))
    last = max(trained)
    return full[:last], [full[j + 1] if j + 1 in trained else -100 for j in range(last)]


def loader_documents(index: Path, tok, **entry) -> dict[int, tuple[list[int], list[int]]]:
    """{line: (input_ids, labels)} of every document the loader packs from `index` (one epoch)."""
    cfg = [{"dataset_name": "chat", "task_name": "chat", "path": str(index), "abs_weight": 1.0,
            "allow_repeat": False, **entry}]
    docs: dict[int, tuple[list[int], list[int]]] = {}
    for batch in MixtureLoader(cfg, tok, max_length=512, batch_size=1, seed=3):
        pos, ids, labels = (batch[k][0].tolist() for k in ("position_ids", "input_ids", "labels"))
        task = batch["task_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0 and task[i] >= 0]
        starts.append(task.index(-1) if -1 in task else len(task))
        for (_, line), a, b in zip(batch["sample_lines"].tolist(), starts, starts[1:]):
            docs[line] = (ids[a:b], labels[a:b])
    return docs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_labels_are_the_assistant_spans_of_apply_chat_template(tmp_path, tok, fmt, train_on):
    record, messages = RECORDS[fmt]
    build_index(write_jsonl(tmp_path / "src.jsonl", [record, record]), tmp_path / "idx", language="en",
                format="auto" if fmt == "io" else fmt)
    entry = {"chat_template": "tokenizer"} if fmt == "io" else {}  # {input, output} records render only when asked
    docs = loader_documents(tmp_path / "idx", tok, train_on=train_on, **entry)
    assert set(docs) == {0, 1}
    want = expected(tok, messages, train_on)
    for ids, labels in docs.values():
        assert (ids, labels) == want
        assert labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # the model learns to stop
    assert fm9g.data.tokenize_record(record, tok, chat_template="tokenizer", train_on=train_on) == want


def test_multi_turn_trains_every_assistant_turn_by_default(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, labels = fm9g.data.tokenize_record({"messages": DIALOGUE}, tok)
    trained = tok.decode([t for t in labels if t != -100])
    assert trained == "".join(m["content"] + "<|im_end|>" for m in DIALOGUE if m["role"] == "assistant")
    _, last = fm9g.data.tokenize_record({"messages": DIALOGUE}, tok, train_on="last_assistant")
    assert tok.decode([t for t in last if t != -100]) == DIALOGUE[-1]["content"] + "<|im_end|>"
    _, every = fm9g.data.tokenize_record({"messages": DIALOGUE}, tok, train_on="all")
    assert every.count(-100) == 0  # every token predicted, system and user turns too


def test_templates_without_end_of_turn_get_eos_and_think_is_trained_as_rendered(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    ids, labels = fm9g.data.tokenize_record({"input": "北京", "output": "是"}, tok, chat_template="userai")
    assert tok.decode(ids) == "<用户>北京<AI>是" and labels[-1] == tok.eos_token_id
    (tmp_path / "think.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}<think>\n"
        "{{ m.get('reasoning_content', '') }}\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rec = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]}
    _, labels = fm9g.data.tokenize_record(rec, tok, chat_template=str(tmp_path / "think.jinja"))
    assert tok.decode([t for t in labels if t != -100]) == "<think>\ntwo and two\n</think>\n\n4<|im_end|>"


def test_bos_follows_the_tokenizer(tmp_path, smollm2_tokenizer, qwen2_style):
    im_start = smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")
    # SmolLM2 (BOS <|im_start|>, not added by the tokenizer): ChatML samples start with one <|im_start|>
    for rec, kw in (({"input": "hi", "output": "hello"}, {"transforms": "chatml"}), ({"messages": DIALOGUE}, {})):
        build_index(write_jsonl(tmp_path / "s.jsonl", [rec]), tmp_path / "i", language="en", overwrite=True)
        ((ids, _),) = loader_documents(tmp_path / "i", smollm2_tokenizer, **kw).values()
        assert ids[0] == im_start and ids[1] != im_start
    # a tokenizer without BOS trains; "always" asks for one it does not have
    (w,) = SampleTokenizer(qwen2_style, 64)({"input": "a", "output": "b"})
    plain = lambda text: qwen2_style(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert w.input_ids == plain("a") + plain("b") and w.labels == [-100] * (len(plain("a")) - 1) + plain("b") + [
        qwen2_style.eos_token_id]
    build_index(write_jsonl(tmp_path / "q.jsonl", [{"input": "a", "output": "b"}]), tmp_path / "q", language="en")
    ((ids, labels),) = loader_documents(tmp_path / "q", qwen2_style).values()
    assert (ids, labels) == (w.input_ids, w.labels)
    with pytest.raises(ValueError, match="no bos_token_id"):
        SampleTokenizer(qwen2_style, 64, bos="always")
    # never twice: "always" keeps a BOS the template already wrote
    ids, _ = fm9g.data.tokenize_record({"messages": DIALOGUE}, smollm2_tokenizer, bos="always")
    assert ids[:2].count(im_start) == 1
    ids, _ = fm9g.data.tokenize_record({"input": "hi", "output": "hello"}, smollm2_tokenizer, bos="always")
    assert ids[0] == im_start
    ids, _ = fm9g.data.tokenize_record({"input": "hi", "output": "hello"}, smollm2_tokenizer)
    assert ids[0] != im_start


def test_the_original_tokenizer_keeps_s_first(tmp_path):
    """A sentencepiece tokenizer like the original FM9G / MiniCPM one adds <s> itself: kept first, once."""
    import sentencepiece as spm

    from fm9g.data.tokenizers import load_tokenizer

    lines = [f"保持健康的三个提示 {i} hello world" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    (w,) = SampleTokenizer(tok, 64)({"input": "hello", "output": "world"})
    assert w.input_ids[0] == 1 and w.input_ids[1] != 1 and w.labels[-1] == 2
    (w,) = SampleTokenizer(tok, 64, bos="never")({"input": "hello", "output": "world"})
    assert w.input_ids[0] != 1


def test_parity_passes_and_names_a_planted_mismatch(tmp_path, tok):
    records = [r for r, _ in RECORDS.values()]
    report = check_chat_parity(records, tok)
    assert report.ok, report.summary()
    assert report.records == 4 and report.turns == 3 + 2 + 1 + 1
    # the original add_template.py's mistake: the user role written "User"
    (tmp_path / "cap.jinja").write_text(tok.chat_template.replace(
        "message['role']", "(message['role'] if message['role'] != 'user' else 'User')"))
    bad = check_chat_parity(records, tok, chat_template=str(tmp_path / "cap.jinja"))
    assert not bad.ok and {p.record for p in bad.problems} == {0, 1, 2, 3}
    first = bad.problems[0]
    assert first.turn == 1 and "training 'User'" in first.message and "serving 'user'" in first.message
    assert "record 0 (line 1): assistant turn at message 1: prompt token" in bad.summary()
    # a template that writes no assistant turn leaves nothing to train: reported
    (tmp_path / "mute.jinja").write_text("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n"
                                         "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    empty = check_chat_parity(records[:1], tok, chat_template=str(tmp_path / "mute.jinja"))
    assert [p.message for p in empty.problems] == ["the trained span is empty: no token carries a label"]


def test_inspect_data_command(tmp_path, smollm2_tokenizer_dir, capsys):
    from fm9g.cli import main

    build_index(write_jsonl(tmp_path / "s.jsonl", [r for r, _ in RECORDS.values()]), tmp_path / "idx", language="en")
    args = ["inspect-data", str(tmp_path / "idx"), "--tokenizer", str(smollm2_tokenizer_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "training matches serving" in out and "«The capital of Atlantis is Poseidonia.<|im_end|>»" in out
    assert main(args + ["--chat-template", "chatml-original", "--no-show"]) == 1
    out = capsys.readouterr().out
    assert "record 0 (line 1): assistant turn at message 1: prompt token" in out and "differs" in out
    assert main(["inspect-data", str(tmp_path / "nowhere"), "--tokenizer", str(smollm2_tokenizer_dir)]) == 2


@pytest.mark.parametrize("line,problem", [
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "unknown from 'bot'"),
    ({"instruction": 3, "output": "a"}, "'instruction' must be a string"),
])
def test_bad_records_name_file_and_line_and_write_nothing(tmp_path, line, problem):
    src = write_jsonl(tmp_path / "s.jsonl", [{"messages": DIALOGUE}, line])
    with pytest.raises(InvalidLineError, match=problem) as err:
        build_index(src, tmp_path / "idx", language="en")
    assert f"{src}:2:" in str(err.value)
    assert not (tmp_path / "idx").exists()


def test_template_problems_name_file_and_line(tmp_path, smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    (tmp_path / "strict.jinja").write_text(
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom here') }}{% endif %}"
        + BUILTIN_TEMPLATES["chatml"].split("{%- for message in messages %}")[1].split("{%- endfor %}")[0]
        .replace("message", "m") + "{% endfor %}")
    records = [{"messages": DIALOGUE}, {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "a"}]}]
    src = write_jsonl(tmp_path / "s.jsonl", records)
    with pytest.raises(InvalidLineError, match="no boom here") as err:  # at build time, with the template
        build_index(src, tmp_path / "idx", language="en", tokenizer=tok, chat_template=str(tmp_path / "strict.jinja"))
    assert f"{src}:2:" in str(err.value) and not (tmp_path / "idx").exists()
    build_index(src, tmp_path / "idx", language="en")
    with pytest.raises(ChatTemplateError, match=r"idx/data.jsonl:2: .*no boom here"):  # or when training reads it
        loader_documents(tmp_path / "idx", tok, chat_template=str(tmp_path / "strict.jinja"))
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        loader_documents(tmp_path / "idx", tok)
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        build_index(src, tmp_path / "idx2", language="en", tokenizer=tok, chat_template="tokenizer")
    assert not (tmp_path / "idx2").exists()


def test_chat_and_plain_datasets_mix_and_resume_exactly(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    build_index(write_jsonl(tmp_path / "c.jsonl", [{"messages": DIALOGUE[: 2 * (i % 3 + 1)]} for i in range(30)]),
                tmp_path / "chat", language="en")
    build_index(write_jsonl(tmp_path / "p.jsonl", [{"output": f"plain text number {i} " * 5} for i in range(30)]),
                tmp_path / "plain", language="en")
    cfg = [{"dataset_name": "c", "task_name": "chat", "path": str(tmp_path / "chat"), "abs_weight": 0.5},
           {"dataset_name": "p", "task_name": "plain", "path": str(tmp_path / "plain"), "abs_weight": 0.5}]
    straight = MixtureLoader(cfg, tok, max_length=128, batch_size=2, seed=1)
    it = iter(straight)
    for _ in range(3):
        next(it)
    state = straight.state_dict()
    rest = [next(it)["input_ids"] for _ in range(4)]
    again = MixtureLoader(cfg, tok, max_length=128, batch_size=2, seed=1)
    again.load_state_dict(state)
    it2 = iter(again)
    assert all((next(it2)["input_ids"] == r).all() for r in rest)
    stats = straight.stats()
    assert stats["chat"]["label_tokens"] > 0 and stats["plain"]["tokens"] > 0


def test_a_transform_may_return_messages(tmp_path, smollm2_tokenizer):
    (tmp_path / "t.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    return {'messages': [{'role': 'user', 'content': data['q']}, {'role': 'assistant', 'content': data['a']}]}\n")
    build_index(write_jsonl(tmp_path / "s.jsonl", [{"q": "Hi?", "a": "Hello.", "output": ""}]), tmp_path / "i", language="en")
    ((ids, labels),) = loader_documents(tmp_path / "i", smollm2_tokenizer, transforms=str(tmp_path / "t.py")).values()
    assert (ids, labels) == expected(smollm2_tokenizer, [{"role": "user", "content": "Hi?"},
                                                         {"role": "assistant", "content": "Hello."}])


def test_a_tokenizer_without_bos_trains(tmp_path, qwen2_style):
    """Issue 32: a Qwen2-style tokenizer (no BOS) could not train at all; now the Trainer runs on it."""
    from fm9g import FM9GConfig, TrainConfig, Trainer

    qwen2_style.save_pretrained(tmp_path / "tok")
    build_index(write_jsonl(tmp_path / "s.jsonl", [{"messages": DIALOGUE}, {"input": "2+2?", "output": "4"}] * 4),
                tmp_path / "idx", language="en")
    cfg = TrainConfig(model=FM9GConfig.from_name("tiny", vocab_size=len(qwen2_style)), tokenizer_path=str(tmp_path / "tok"),
                      data=[{"dataset_name": "d", "task_name": "d", "path": str(tmp_path / "idx"), "abs_weight": 1.0,
                             "chat_template": "tokenizer"}],
                      lr=1e-2, train_iters=3, batch_size=1, max_length=128, save=str(tmp_path / "ck"),
                      model_unique="nobos", save_iters=3, progress_bar=False, log_iters=1, inspect_iters=0)
    result = Trainer(cfg).fit()
    assert result.step == 3 and all(x == x for x in result.losses)
