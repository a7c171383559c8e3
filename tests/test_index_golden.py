"""The original ``{input, output}`` (and .txt) sources build the same index bytes as before chat
records were accepted (issue 27): the digests below were computed by the code at commit 3cc0392,
before the chat-data change, from the sources written here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fm9g.data.indexed import build_index

# sha256 over data.jsonl, index, meta.json (source paths reduced to file names) and index.h5,
# as built at commit 3cc0392
GOLDEN = {
    "zh": "fea8f21102385825adaf706a3f7b0f806d94056b781539d254883ff090353706",
    "en": "bd149d41e7c1a45a6d023eeca1cdff447828b857a5537d61e71995ad2d1491e7",
    "tokenizer": "23489b898f4f4d00e32165acf5909dfecc34e7695aa467a9d718a8a94396c6f8",  # SmolLM2's, language en
}


def write_sources(root: Path) -> Path:
    """A folder of original-format sources: jsonl with blank lines, CRLF ends, null input and
    extra keys; a .txt one level down; a .json with a byte-order mark."""
    src = root / "src"
    (src / "sub").mkdir(parents=True, exist_ok=True)
    recs = [{"input": f"问题 {i}", "output": f"回答 {i} " * (i % 7 + 1)} for i in range(40)]
    recs += [{"output": "pretraining text only"}, {"input": None, "output": "null input"},
             {"input": "x", "output": "y", "extra": [1, 2, {"k": "v" * 80}]}]
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    (src / "a.jsonl").write_text("\n".join(lines[:20]) + "\n\n" + "\r\n".join(lines[20:]), encoding="utf-8")
    (src / "sub" / "b.txt").write_text("line one\n\n  line two  \n第三行\n", encoding="utf-8")
    (src / "c.json").write_bytes(b"\xef\xbb\xbf" + (json.dumps({"input": "bom", "output": "first"}) + "\n").encode())
    return src


def digest(out: Path) -> str:
    """sha256 of an index directory's files (meta.json's source paths reduced to names, and the
    tokenizer folder it names to the folder's name without the cache stamp)."""
    h = hashlib.sha256()
    for name in ("data.jsonl", "index"):
        h.update((out / name).read_bytes())
    meta = json.loads((out / "meta.json").read_text())
    meta["sources"] = [Path(s).name for s in meta["sources"]]
    if str(meta.get("token_count", "")).startswith("tokenizer:"):  # the tokenizer's folder: where the test cache is
        meta["token_count"] = "tokenizer:" + Path(meta["token_count"].split(":", 1)[1]).name.rsplit("-", 1)[0]
    h.update(json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
    h.update((out / "index.h5").read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("language", ["zh", "en"])
def test_original_sources_build_the_same_bytes(tmp_path, language):
    src = write_sources(tmp_path)
    build_index(src, tmp_path / "idx", language=language, num_workers=1, block_size=256)
    assert digest(tmp_path / "idx") == GOLDEN[language]


def test_original_sources_build_the_same_bytes_with_a_tokenizer(tmp_path, smollm2_tokenizer):
    src = write_sources(tmp_path)
    build_index(src, tmp_path / "idx", language="en", tokenizer=smollm2_tokenizer, num_workers=1, block_size=256)
    assert digest(tmp_path / "idx") == GOLDEN["tokenizer"]
