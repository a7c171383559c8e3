"""fm9g.data.tokenizers: the tokenizer forms of the original stack, remote code only on request,
and exports that transformers 4.44 and 5 both load."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fm9g._io import ConfigError
from fm9g.data.tokenizers import load_tokenizer, make_tokenizer_dir_compatible, needs_remote_code, save_tokenizer

TEXTS = ["中国的首都是北京。", "保持健康的三个提示：保持身体活动。", "hello world 2024", "混合 mixed 文本 😀"]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    """The seed's layout: ./tokenizer/tokenizer.model, a sentencepiece model trained here (BPE with
    byte fallback, <unk>=0 <s>=1 </s>=2 as in the FM9G tokenizers)."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    (root / "tokenizer").mkdir()
    lines = [f"{t} 第{i}行 line {i}" for i in range(300) for t in TEXTS[:3]]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(root / "tokenizer" / "tokenizer"),
                                   vocab_size=400, model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return root


def test_the_seeds_sentencepiece_tokenizer_path_loads(spm_dir, monkeypatch):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer" / "tokenizer.model"))
    monkeypatch.chdir(spm_dir)
    for path in ("./tokenizer/tokenizer.model", "./tokenizer"):  # the file (the seed's value) or its folder
        tok = load_tokenizer(path)
        assert len(tok) == sp.get_piece_size()
        assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)
        for text in TEXTS:
            assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text


def test_a_missing_tokenizer_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer("./tokenizer/tokenizer.model")
    assert str(err.value).startswith("no tokenizer at ./tokenizer/tokenizer.model")
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer at empty"):
        load_tokenizer("empty")


def test_hugging_face_directory_and_tokenizer_json(smollm2_tokenizer_dir, smollm2_tokenizer, tmp_path):
    text = "The capital of France is Paris. <|im_start|>user"
    want = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert load_tokenizer(smollm2_tokenizer_dir).encode(text, add_special_tokens=False) == want
    assert load_tokenizer(smollm2_tokenizer_dir / "tokenizer.json").eos_token == smollm2_tokenizer.eos_token
    shutil.copy(smollm2_tokenizer_dir / "tokenizer.json", tmp_path / "only.json")  # the file alone
    assert load_tokenizer(tmp_path / "only.json").encode(text, add_special_tokens=False) == want


def _dir_with_code(src: Path, dst: Path) -> Path:
    """A tokenizer directory whose auto_map points at a tokenization_*.py that leaves a mark when run."""
    shutil.copytree(src, dst)
    (dst / "tokenization_fm9g.py").write_text(
        "from pathlib import Path\n"
        "from transformers import PreTrainedTokenizerFast\n"
        f"Path({str(dst / 'CODE_RAN')!r}).write_text('yes')\n"  # transformers runs a cached copy

        "class FM9GTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_fm9g.FM9GTokenizer"]}
    cfg["tokenizer_class"] = "FM9GTokenizer"
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_remote_code_runs_only_when_trusted(smollm2_tokenizer_dir, tmp_path):
    d = _dir_with_code(smollm2_tokenizer_dir, tmp_path / "ckpt")
    assert needs_remote_code(d) == ["tokenization_fm9g.py"]
    with pytest.raises(ConfigError, match="trust_remote_code") as err:
        load_tokenizer(d)
    assert "tokenization_fm9g.py" in str(err.value)
    assert not (d / "CODE_RAN").exists()
    tok = load_tokenizer(d, trust_remote_code=True)
    assert type(tok).__name__ == "FM9GTokenizer" and (d / "CODE_RAN").exists()
    assert needs_remote_code(smollm2_tokenizer_dir) == []




def test_saved_tokenizers_load_in_transformers_4_44_and_5(smollm2_tokenizer, spm_dir, tmp_path, compat_python):
    chat = [{"role": "user", "content": "中国的首都是哪里？"}]
    want = {}
    for name, tok in (("smollm2", smollm2_tokenizer), ("spm", load_tokenizer(spm_dir / "tokenizer"))):
        save_tokenizer(tok, tmp_path / name)
        again = load_tokenizer(tmp_path / name)  # transformers 5 reads it back the same
        want[name] = {
            "ids": [again.encode(t, add_special_tokens=False) for t in TEXTS],
            "special": [again.bos_token, again.eos_token],
            "chat": again.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            if again.chat_template else None,
        }
        assert want[name]["ids"] == [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    # a folder transformers 5 wrote (e.g. tokenizer files copied into an export), fixed in place
    smollm2_tokenizer.save_pretrained(tmp_path / "copied")
    make_tokenizer_dir_compatible(tmp_path / "copied")
    want["copied"] = want["smollm2"]
    code = (
        "import json, sys, transformers\n"
        "from transformers import AutoTokenizer\n"
        "root, texts, chat = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])\n"
        "got = {}\n"
        "for name in ('smollm2', 'spm', 'copied'):\n"
        "    tok = AutoTokenizer.from_pretrained(f'{root}/{name}')\n"
        "    got[name] = {'ids': [tok.encode(t, add_special_tokens=False) for t in texts],\n"
        "                 'special': [tok.bos_token, tok.eos_token],\n"
        "                 'chat': tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)\n"
        "                 if tok.chat_template else None}\n"
        "print(transformers.__version__)\n"
        "print(json.dumps(got))\n"
    )
    out = subprocess.run([compat_python, "-c", code, str(tmp_path), json.dumps(TEXTS), json.dumps(chat)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    version, got = out.stdout.strip().splitlines()[-2:]
    assert version.startswith("4."), version
    assert json.loads(got) == want
    assert "FutureWarning" not in out.stderr, out.stderr[-2000:]


def test_the_8b_vocab_txt_format(tmp_path):
    from fm9g.data.tokenize import SampleTokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["中", "中国", "首都", "是", "北京", "。", "<用户>", "<AI>", "hello", " ", "he"]
    (tmp_path / "8b").mkdir()
    (tmp_path / "8b" / "vocab.txt").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tokens),
                                               encoding="utf-8")
    for path in (tmp_path / "8b", tmp_path / "8b" / "vocab.txt"):
        tok = load_tokenizer(path)
        assert (len(tok), tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (len(tokens), 0, 1, 2)
    ids = tok.encode("<用户>中国的首都是北京。<AI>hello 😀")
    # greedy longest match ("中国", not "中"); "的" and the emoji are not tokens: their UTF-8 bytes
    assert ids[:2] == [tokens.index("<用户>"), tokens.index("中国")]
    assert ids[2:5] == [3 + b for b in "的".encode()]
    assert ids[-4:] == [3 + b for b in "😀".encode()]
    assert tok.decode(ids) == "<用户>中国的首都是北京。<AI>hello 😀"
    assert tok.encode("hi", add_special_tokens=True)[0] == 1
    sample, = SampleTokenizer(tok, max_length=64)({"input": "<用户>北京<AI>", "output": "是"})
    assert sample.input_ids[0] == 1 and sample.labels[-1] == 2
    (tmp_path / "bad.txt").write_text("not quoted\n")
    with pytest.raises(ConfigError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "bad.txt")
