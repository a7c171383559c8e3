"""Transforms: built-ins (identity, chatml) and users' transform files with their errors."""
from __future__ import annotations

import random

import pytest

from fm9g.data.transforms import TransformError, load_transform

R = random.Random(0)


def test_identity_and_none():
    t = load_transform(None)
    assert t({"input": "q", "output": "a", "extra": 1}, 0, R) == {"input": "q", "output": "a"}
    assert load_transform("identity")({"output": "a"}, 0, R) == {"input": "", "output": "a"}


def test_chatml_lowercase_user_and_original():
    out = load_transform("chatml")({"input": "Hi?", "output": "Hello."}, 0, R)
    assert out["input"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out["output"] == "Hello.<|im_end|>"
    orig = load_transform("chatml-original")({"input": "Hi?", "output": "Hello."}, 0, R)
    assert "<|im_start|>User\nHi?" in orig["input"] and orig["output"] == "Hello.<|im_end|>"
    assert load_transform("userai")({"input": "问", "output": "答"}, 0, R) == {"input": "<用户>问<AI>", "output": "答"}


def test_chatml_matches_hf_chat_template(smollm2_tokenizer):
    """Our training prompt equals what apply_chat_template renders for the same conversation."""
    tok = smollm2_tokenizer
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi?"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == load_transform("chatml")({"input": "Hi?", "output": "x"}, 0, R)["input"]


def test_user_file_relative_to_base_dir(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "t.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    return {'input': data['q'].upper(), 'output': data['a'] + str(num_sample)}\n"
    )
    t = load_transform("t.py", base_dir=tmp_path / "cfg", task_name="my task")
    assert t({"q": "abc", "a": "x"}, 2, R) == {"input": "ABC", "output": "x2"}
    assert load_transform(str(tmp_path / "cfg" / "t.py"))({"q": "a", "a": "b"}, 0, R)["input"] == "A"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.py.*task 'math'"):
        load_transform("nope.py", base_dir=tmp_path, task_name="math")
    with pytest.raises(TransformError, match="unknown transform 'chatm'"):
        load_transform("chatm")


def test_missing_function_and_bad_signature(tmp_path):
    (tmp_path / "f.py").write_text("def transfrom(data, num_sample, r):\n    return data\n")
    with pytest.raises(TransformError, match="defines no function 'transform'"):
        load_transform(tmp_path / "f.py")
    (tmp_path / "g.py").write_text("def transform(data):\n    return data\n")
    with pytest.raises(TransformError, match=r"cannot be called as transform\(data, num_sample, r\)"):
        load_transform(tmp_path / "g.py")
    (tmp_path / "h.py").write_text("import not_a_module_xyz\n")
    with pytest.raises(TransformError, match="importing transform file .*h.py failed"):
        load_transform(tmp_path / "h.py")


@pytest.mark.parametrize(
    "body,message",
    [
        ("return ['a', 'b']", "returned list"),
        ("return {'input': 'a'}", "without 'output'"),
        ("return {'output': 3}", "'output' of type int"),
        ("return {'input': 1, 'output': 'x'}", "'input' of type int"),
    ],
)
def test_wrong_return_shape(tmp_path, body, message):
    (tmp_path / "t.py").write_text(f"def transform(data, num_sample, r):\n    {body}\n")
    t = load_transform("t.py", base_dir=tmp_path, task_name="task1")
    with pytest.raises(TransformError, match=message) as exc:
        t({"output": "x"}, 0, R)
    assert "t.py" in str(exc.value) and "task1" in str(exc.value)


def test_none_return_skips_and_callables(tmp_path):
    (tmp_path / "t.py").write_text("def transform(data, num_sample, r):\n    return None\n")
    assert load_transform(tmp_path / "t.py")({"output": "x"}, 0, R) is None
    assert load_transform(lambda d, n, r: {"output": d["output"] * 2})({"output": "x"}, 0, R) == {"output": "xx"}
