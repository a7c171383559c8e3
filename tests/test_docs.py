"""Every example in README.md and docs/*.md runs as written.

For each markdown file, its ```python blocks are exec()'d in order in one namespace, with the
working directory set to a fresh temporary directory; lines of ```bash / ```sh / ```console blocks
that start with `fm9g ` (after an optional `$ `) run as `python -m fm9g ...` in that directory,
after the python blocks before them. Other shell lines (pip install, torchrun, python script.py,
vllm, bash scripts/setup.sh) are not run. ```json and unlabelled blocks are data / output, not run.

A block that cannot run on a CPU CI machine carries, on the line just before its fence,
`<!-- fm9g-docs: skip (REASON) -->`; it is reported as a skipped test with that reason.

The namespace starts with TOKENIZER_DIR: a Hugging Face tokenizer directory (SmolLM2's, from the
`smollm2_tokenizer_dir` fixture), which the docs use where a real tokenizer is needed.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)[^\n`]*$")
SKIP = re.compile(r"<!--\s*fm9g-docs:\s*skip\s*\((?P<reason>.*)\)\s*-->")


@dataclass
class Block:
    path: str
    line: int          # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None   # reason, when marked skip


def extract_blocks(path: str, text: str | None = None) -> list[Block]:
    """The fenced blocks of a markdown file (or of `text`), in order."""
    if text is None:
        text = (ROOT / path).read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(prev)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n", skip["reason"] if skip else None))
        i = j + 1
    return blocks


def fm9g_commands(code: str) -> list[list[str]]:
    """The `fm9g ...` command lines of a shell block, as argv lists (comments dropped)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:].lstrip()
        if line.startswith("fm9g "):
            out.append(shlex.split(line, comments=True)[1:])
    return out


def runnable(block: Block) -> bool:
    return block.lang == "python" or (block.lang in SHELL_LANGS and bool(fm9g_commands(block.code)))


ALL = {path: [b for b in extract_blocks(path) if runnable(b)] for path in DOC_FILES}
SKIPPED = [b for blocks in ALL.values() for b in blocks if b.skip is not None]


def test_docs_have_examples():
    assert set(DOC_FILES) >= {"README.md", "docs/model.md", "docs/data.md", "docs/mixture.md",
                              "docs/training.md", "docs/lora.md", "docs/convert.md"}
    for path, blocks in ALL.items():
        assert blocks, f"{path} has no runnable example"


@pytest.mark.parametrize("path", DOC_FILES)
def test_doc_examples(path, tmp_path, monkeypatch, smollm2_tokenizer_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.manual_seed(0)
    namespace = {"__name__": "__main__", "TOKENIZER_DIR": str(smollm2_tokenizer_dir)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ran = 0
    for block in ALL[path]:
        if block.skip is not None:
            continue
        where = f"{path}:{block.line}"
        if block.lang == "python":
            try:
                exec(compile(block.code, where, "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"the python example at {where} failed:\n{block.code}") from err
        else:
            for argv in fm9g_commands(block.code):
                proc = subprocess.run([sys.executable, "-m", "fm9g", *argv], cwd=tmp_path, env=env,
                                      capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, (
                    f"`fm9g {shlex.join(argv)}` at {where} exited with {proc.returncode}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ran += 1
    assert ran, f"{path}: every example is skipped"


@pytest.mark.parametrize("block", SKIPPED, ids=[f"{b.path}:{b.line}" for b in SKIPPED])
def test_doc_skipped(block):
    pytest.skip(f"{block.path}:{block.line}: {block.skip}")


def test_readme_commands_run_in_docs():
    """The README's command lines (skipped above: they read files the docs' examples make) each run
    in some docs/*.md example, as written (the doc may add trailing options such as --overwrite)."""
    readme = [argv for b in ALL["README.md"] if b.lang in SHELL_LANGS for argv in fm9g_commands(b.code)]
    assert readme
    run = [argv for path, blocks in ALL.items() if path != "README.md"
           for b in blocks if b.lang in SHELL_LANGS and b.skip is None for argv in fm9g_commands(b.code)]
    missing = [shlex.join(a) for a in readme if not any(d[:len(a)] == a for d in run)]
    assert not missing, f"README commands that no docs/*.md example runs: {missing}"


def test_extract_blocks_and_commands():
    md = "\n".join([
        "intro", "```python", "x = 1", "```", "",
        "<!-- fm9g-docs: skip (needs CUDA) -->", "```python", "y = 2", "```",
        "* a list item:", "", "  ```bash", "  $ fm9g inspect a.pt   # comment", "  pip install x", "  ```",
        "```json", "{}", "```", "```", "fm9g not a shell block", "```",
    ])
    blocks = extract_blocks("x.md", md)
    assert [(b.lang, b.line, b.skip) for b in blocks] == [
        ("python", 2, None), ("python", 7, "needs CUDA"), ("bash", 12, None), ("json", 16, None), ("", 19, None)]
    assert blocks[0].code == "x = 1\n"
    assert fm9g_commands(blocks[2].code) == [["inspect", "a.pt"]]
    assert [runnable(b) for b in blocks] == [True, True, True, False, False]
