"""A GGUF file (llama.cpp's format) -> a plain Hugging Face directory.

``gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf")`` writes ``config.json``, the weights
as safetensors (dequantised to fp32) and the tokenizer, a folder that stock transformers, vLLM,
``hf_to_bmt`` and ``TrainConfig(pretrained_model=...)`` load. transformers reads the GGUF (it needs
the ``gguf`` package, and ``accelerate``); its own ``save_pretrained`` refuses a GGUF-loaded model
while the model still carries the GGUF quantizer record, which is dropped here once the weights
are plain fp32 tensors.

Command line: ``fm9g convert gguf2hf FILE OUT`` (``fm9g convert hf2bmt`` takes a ``.gguf`` too).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import torch

from fm9g._io import atomic_dir

__all__ = ["gguf_to_hf", "GGUF_NEEDS", "gguf_special_token_ids", "set_special_tokens"]

GGUF_NEEDS = ("transformers", "gguf", "accelerate")  # what transformers needs to read a GGUF file


def _conversion_error(msg: str) -> Exception:
    from fm9g.convert.files import ConversionError

    return ConversionError(msg)


def gguf_to_hf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
               dtype: torch.dtype = torch.float32, save_tokenizer: Callable[[Any, Path], Any] | None = None) -> Path:
    """Dequantise `gguf_file` into the Hugging Face directory `out_dir` (written atomically).

    Args:
        gguf_file: a ``.gguf`` file of a model transformers can read from GGUF (Llama, Qwen2, ...).
        out_dir: the folder to write (config.json, model.safetensors, tokenizer files).
        overwrite: replace an existing `out_dir` (else it is an error).
        dtype: the dtype of the written weights (default fp32, what the dequantisation gives).
        save_tokenizer: ``f(tokenizer, folder)`` writing the tokenizer (default its
            ``save_pretrained``; ``fm9g convert gguf2hf`` passes
            :func:`fm9g.data.tokenizers.save_tokenizer`, whose files transformers 4.44 loads too).
    Returns:
        `out_dir` as a Path.
    Raises:
        ConversionError: no such file, `out_dir` exists, or a package transformers needs is missing
            (named, with the pip command).
    """
    src, out = Path(gguf_file).expanduser(), Path(out_dir).expanduser()
    if not src.is_file():
        raise _conversion_error(f"no GGUF file at {src.resolve()}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise _conversion_error(f"{out} exists and is not empty: choose another folder, or pass overwrite=True "
                                "(--overwrite) to replace it")
    missing = [m for m in GGUF_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise _conversion_error(f"reading a GGUF file needs {', '.join(missing)}: pip install {' '.join(missing)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never a Hub lookup
    with atomic_dir(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=dtype)
        set_special_tokens(tokenizer, model, gguf_special_token_ids(src))
        model.hf_quantizer = None  # the weights are plain tensors now: no quantizer record to save
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        (save_tokenizer or (lambda t, folder: t.save_pretrained(str(folder))))(tokenizer, tmp)
    return out


#: GGUF metadata key of each special token's id -> the tokenizer attribute it names
_SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                 "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_token_ids(gguf_file: str | os.PathLike) -> dict[str, int]:
    """The special tokens' ids the GGUF file declares (``{"bos": 1, "eos": 2, ...}``; those it has)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    out = {}
    for role, key in _SPECIAL_KEYS.items():
        f = fields.get(key)
        if f is not None and f.data:
            out[role] = int(f.parts[f.data[0]][0])
    return out


def set_special_tokens(tokenizer: Any, model: Any, ids: dict[str, int]) -> None:
    """Make the tokenizer's and the model's special tokens the ones the GGUF file declares.

    transformers' GGUF reader does not always keep them: 5.17 gives SmolLM2-135M-Instruct
    ``eos_token = "<|im_start|>"`` (the file says id 2, ``<|im_end|>``), so generation would not
    stop at the end of a turn and an SFT run would train the wrong end-of-text token.
    """
    for role, i in ids.items():
        token = tokenizer.convert_ids_to_tokens(i)
        if token is None or i >= len(tokenizer):
            continue  # an id outside the vocabulary: leave transformers' choice
        setattr(tokenizer, f"{role}_token", token)
        if role in ("bos", "eos", "pad"):
            for cfg in (model.config, getattr(model, "generation_config", None)):
                if cfg is not None:
                    setattr(cfg, f"{role}_token_id", i)

