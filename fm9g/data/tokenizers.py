"""Load and save tokenizers in the forms FM9G users have them.

``load_tokenizer(path)`` accepts what the original scripts pointed ``--tokenizer_path`` at:

* a Hugging Face tokenizer directory (``tokenizer_config.json`` + ``tokenizer.json`` and/or
  ``tokenizer.model``), e.g. the downloaded model folder ``./ckpt``;
* a ``tokenizer.json`` file (the fast-tokenizer file alone);
* a sentencepiece ``.model`` file, e.g. the original default ``./tokenizer/tokenizer.model``, or a
  folder holding only one (converted to a fast tokenizer; ids are the sentencepiece ids);
* the 2024 FM9G-8B ``vocab.txt`` (one JSON-quoted token per line, id = line number), or a folder
  holding one: :class:`VocabTxtTokenizer` (greedy longest match, UTF-8 byte fallback).

Python code shipped in a tokenizer directory (``tokenization_*.py`` named by ``auto_map``, as the
FM9G 4B / 7B / 70B folders do) runs only with ``trust_remote_code=True``; without it the error says
so. A path that does not exist is ``FileNotFoundError("no tokenizer at PATH ...")``, not a Hub lookup.

``save_tokenizer(tok, out_dir)`` writes a directory that transformers 4.44 (the release the original
stack pins) and transformers 5 both load.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fm9g._io import ConfigError, atomic_write_text, name_list, nearby_hint

__all__ = ["load_tokenizer", "save_tokenizer", "make_tokenizer_dir_compatible", "needs_remote_code",
           "VocabTxtTokenizer", "TOKENIZER_FILES"]

# files that make a folder a Hugging Face tokenizer directory
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer_config.json", "tokenizer.json")

# tokenizer classes transformers 5 writes that transformers 4.x does not have -> the 4.x class
# that loads the same tokenizer.json
_V5_ONLY_CLASSES: dict[str, str] = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _what_to_give(path: str | os.PathLike[str]) -> str:
    shown = str(path) if os.path.isabs(path) else f"{path} ({os.path.abspath(path)})"
    return (f"no tokenizer at {shown}{nearby_hint(path)}: give a Hugging Face tokenizer directory, a tokenizer.json "
            "file or a sentencepiece .model file (tokenizer_path)")


def needs_remote_code(folder: str | os.PathLike[str]) -> list[str]:
    """The Python files of `folder` that loading its tokenizer would run (``auto_map`` in
    ``tokenizer_config.json`` or ``config.json`` naming an ``AutoTokenizer``); ``[]`` when none."""
    folder = Path(folder)
    modules: list[str] = []
    for name in ("tokenizer_config.json", "config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            auto_map = json.loads(f.read_text(encoding="utf-8")).get("auto_map") or {}
        except (ValueError, AttributeError):
            continue
        refs = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
        for ref in refs if isinstance(refs, (list, tuple)) else [refs]:
            if isinstance(ref, str) and "." in ref:
                modules.append(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(set(modules))


class VocabTxtTokenizer:
    """The FM9G-8B tokenizer format: ``vocab.txt`` holds one JSON-quoted token per line and a
    token's id is its line number (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then ``<0x00>`` ... ``<0xFF>``).

    Text is split greedily into the longest vocabulary token at each position; a character that
    starts no token is written as its UTF-8 bytes (``<0xNN>`` tokens), or ``<unk>`` when the
    vocabulary has no byte tokens. Decoding joins tokens and re-assembles byte runs as UTF-8.

    Args:
        vocab_file: the ``vocab.txt``.

    Raises:
        ConfigError: a line that is not a JSON string, a repeated token, or no ``<s>`` / ``</s>``.
    """

    def __init__(self, vocab_file: str | os.PathLike[str]) -> None:
        self.vocab_file = str(vocab_file)
        self.id_to_token: list[str] = []
        with open(vocab_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    token = json.loads(line)
                except ValueError:
                    token = None
                if not isinstance(token, str):
                    raise ConfigError(f"{vocab_file}:{n}: expected a JSON-quoted token per line, got {line.strip()[:40]!r}")
                self.id_to_token.append(token)
        self.vocab = {t: i for i, t in enumerate(self.id_to_token)}
        if len(self.vocab) != len(self.id_to_token):
            raise ConfigError(f"{vocab_file}: some tokens appear on more than one line")
        for name in ("<s>", "</s>"):
            if name not in self.vocab:
                raise ConfigError(f"{vocab_file}: no {name} token (the FM9G vocab.txt starts <unk>, <s>, </s>)")
        self.unk_token_id = self.vocab.get("<unk>")
        self.bos_token_id = self.vocab["<s>"]
        self.eos_token_id = self.vocab["</s>"]
        self.bos_token, self.eos_token, self.unk_token = "<s>", "</s>", "<unk>"
        self.special_ids = {i for i in (self.unk_token_id, self.bos_token_id, self.eos_token_id) if i is not None}
        self._byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self._longest = max(map(len, self.id_to_token), default=1)

    def __len__(self) -> int:
        return len(self.id_to_token)

    @property
    def vocab_size(self) -> int:
        """Number of tokens (lines of vocab.txt)."""
        return len(self.id_to_token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (with a leading BOS when `add_special_tokens`)."""
        ids = [self.bos_token_id] if add_special_tokens else []
        i, n = 0, len(text)
        while i < n:
            for k in range(min(self._longest, n - i), 0, -1):
                tid = self.vocab.get(text[i:i + k])
                if tid is not None:
                    ids.append(tid)
                    i += k
                    break
            else:  # no token starts here: the character's UTF-8 bytes
                byte_ids = [self._byte_ids[b] for b in text[i].encode("utf-8")]
                ids.extend(byte_ids if None not in byte_ids else [self.unk_token_id or 0])
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; runs of byte tokens are decoded as UTF-8 (invalid bytes become U+FFFD)."""
        out: list[str] = []
        pending = bytearray()
        for tid in ids:
            tid = int(tid)
            if skip_special_tokens and tid in self.special_ids:
                continue
            token = self.id_to_token[tid]
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                pending.append(int(token[3:5], 16))
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            out.append(token)
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


def _is_vocab_txt(path: Path) -> bool:
    """Whether `path` looks like the FM9G-8B vocab.txt (its first line is a JSON string)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    return len(first) >= 2 and first[0] == first[-1] == '"'


def _sentencepiece_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.model") if p.is_file())


def _from_sentencepiece(model_file: Path) -> Any:
    """A fast tokenizer converted from a sentencepiece model (same ids, same BOS / EOS / UNK) that puts
    BOS first when it encodes text, as the Llama tokenizer the original stack read ``tokenizer.model``
    with (``LlamaTokenizerFast``, transformers 4.44) did: so ``bos="auto"`` keeps ``<s>`` first."""
    from transformers import AutoTokenizer

    # transformers converts a folder that holds only `tokenizer.model`; the user's file may have
    # another name or sit beside unrelated files, so it is loaded from a private copy.
    with tempfile.TemporaryDirectory(prefix="fm9g-spm-") as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        try:
            return AutoTokenizer.from_pretrained(tmp, add_bos_token=True)
        except Exception as err:  # a corrupt file, or a transformers without the converter
            raise ConfigError(f"cannot read the sentencepiece model {model_file}: {err}") from err


def _from_directory(folder: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    code = needs_remote_code(folder)
    if code and not trust_remote_code:
        raise ConfigError(
            f"the tokenizer at {folder} runs Python code shipped in that folder ({name_list(code)}); "
            "if you trust it, pass trust_remote_code=True (TrainConfig: \"trust_remote_code\": true, "
            "or --set trust_remote_code=true)")
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def load_tokenizer(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer from a local directory or file.

    Args:
        path: a Hugging Face tokenizer directory, a ``tokenizer.json`` file, a sentencepiece
            ``.model`` file, a folder whose only tokenizer file is a ``.model``, or the FM9G-8B
            ``vocab.txt`` (or a folder holding it).
        trust_remote_code: allow running the ``tokenization_*.py`` a directory ships (named by its
            ``auto_map``). Off by default: such a directory is refused with a message naming the
            option.

    Returns:
        A transformers tokenizer (``encode``, ``decode``, ``bos_token_id``, ``eos_token_id``, ...);
        a :class:`VocabTxtTokenizer` (the same four) for a vocab.txt.

    Raises:
        FileNotFoundError: nothing at `path`, or a folder without tokenizer files.
        ConfigError: the directory needs remote code and `trust_remote_code` is False; or the file
            cannot be read as a tokenizer.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(_what_to_give(path))
    if p.is_file():
        if p.suffix == ".model":
            return _from_sentencepiece(p)
        if p.suffix == ".json":
            if p.name == "tokenizer.json" and (p.parent / "tokenizer_config.json").is_file():
                return _from_directory(p.parent, trust_remote_code)  # keeps its special tokens
            from transformers import PreTrainedTokenizerFast

            try:
                return PreTrainedTokenizerFast(tokenizer_file=str(p))
            except Exception as err:
                raise ConfigError(f"{p} is not a tokenizers JSON file (tokenizer.json): {err}") from err
        if p.suffix == ".txt" and _is_vocab_txt(p):
            return VocabTxtTokenizer(p)
        raise ConfigError(f"{p} is not a tokenizer file: expected a tokenizer.json, a sentencepiece .model file "
                          "or the FM9G-8B vocab.txt (one JSON-quoted token per line)")
    if any((p / name).is_file() for name in TOKENIZER_FILES):
        return _from_directory(p, trust_remote_code)
    models = _sentencepiece_files(p)
    if len(models) == 1:
        return _from_sentencepiece(models[0])
    if models:
        raise ConfigError(f"{p} holds several sentencepiece models ({name_list([m.name for m in models])}): "
                          "give the one to use as tokenizer_path")
    if (p / "vocab.txt").is_file() and _is_vocab_txt(p / "vocab.txt"):
        return VocabTxtTokenizer(p / "vocab.txt")
    raise FileNotFoundError(_what_to_give(path) + f" (the folder has none of {name_list(list(TOKENIZER_FILES))}, "
                            "a .model file or an FM9G vocab.txt)")


def save_tokenizer(tokenizer: Any, out_dir: str | os.PathLike[str]) -> Path:
    """``tokenizer.save_pretrained(out_dir)``, made loadable by transformers 4.44 as well as 5
    (see :func:`make_tokenizer_dir_compatible`).

    Args:
        tokenizer: a transformers tokenizer.
        out_dir: the directory to write (created if needed; existing tokenizer files are replaced).

    Returns:
        `out_dir` as a Path.
    """
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    make_tokenizer_dir_compatible(out, clean_up_tokenization_spaces=bool(
        getattr(tokenizer, "clean_up_tokenization_spaces", False)))
    return out


def make_tokenizer_dir_compatible(folder: str | os.PathLike[str], *, clean_up_tokenization_spaces: bool = False) -> None:
    """Rewrite the tokenizer files of `folder` in place so that transformers 4.44 (the release the
    original stack pins) loads them as transformers 5 does; a no-op for files 4.x wrote.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` (4.x: "does not exist"), the
    chat template in ``chat_template.jinja`` only (4.44 reads it from ``tokenizer_config.json``) and
    BPE merges as pairs (tokenizers 0.19, which 4.44 requires, reads ``"a b"`` strings). This writes
    the 4.x class that loads the same ``tokenizer.json`` (``PreTrainedTokenizerFast``), copies the
    chat template into ``tokenizer_config.json``, states ``clean_up_tokenization_spaces`` when it is
    missing (the releases default differently) and writes the merges as strings; transformers 5
    reads all of it.

    Args:
        folder: a tokenizer directory (e.g. an export that copied its reference's tokenizer files).
        clean_up_tokenization_spaces: the value to write when tokenizer_config.json has none
            (False: what transformers 5 does by default).
    """
    out = Path(folder)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    changed = False
    cls = config.get("tokenizer_class")
    if cls in _V5_ONLY_CLASSES:
        config["tokenizer_class"] = _V5_ONLY_CLASSES[cls]
        changed = True
    if config_file.is_file() and "clean_up_tokenization_spaces" not in config:  # 4.44 warns, and defaults to True
        config["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        changed = True
    template = out / "chat_template.jinja"
    if template.is_file() and "chat_template" not in config:
        config["chat_template"] = template.read_text(encoding="utf-8")
        changed = True
    if changed:
        atomic_write_text(config_file, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    _write_merges_as_strings(out / "tokenizer.json")


def _write_merges_as_strings(tokenizer_json: Path) -> None:
    """Rewrite BPE merges ``[["a", "b"], ...]`` (tokenizers >= 0.20) as ``["a b", ...]``, the form
    tokenizers 0.19 (the one transformers 4.44 requires) reads and later releases still read.
    Left as is when a merged piece contains a space (the string form could not say where it splits)."""
    if not tokenizer_json.is_file():
        return
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(isinstance(m, list) for m in merges):
        return
    if any(len(m) != 2 or " " in m[0] or " " in m[1] for m in merges):
        return
    model["merges"] = [f"{a} {b}" for a, b in merges]
    atomic_write_text(tokenizer_json, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
