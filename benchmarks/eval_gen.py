"""Issue 28's GPU figures: generation tokens/s of the fm9g-7b shape, and the cost of evaluation in W1.

    python benchmarks/eval_gen.py gen                 # FM9GModel.generate, fm9g-7b shape, bf16, batch 1 and 16
    python benchmarks/eval_gen.py eval                # W1 through Trainer.fit() with eval_iters 100
    python benchmarks/eval_gen.py gen eval --tiny     # CPU smoke of both (what CI runs)

``gen``: random weights of the ``fm9g-7b`` preset in bf16 on one GPU; B prompts of ``--prompt``
random tokens continued by ``--new`` tokens greedily with the KV cache (no eos: every row runs to
the end). Tokens/s = B × new / wall time of the whole ``generate`` call (prefill included), median
of ``--repeat`` calls after one warm-up; the prefill alone is timed too.

``eval``: the W1 workload of ``benchmarks/run.py`` (1.5B shape, one packed row of 4096 tokens per
step, the user's defaults) trained for ``--steps`` steps by ``Trainer(config).fit()`` with
``eval_iters=100`` on ``eval_tokens`` held-out row tokens (``eval_split`` of the same index). The
cost is Σ ``eval_time`` / Σ ``iter_time`` over the stats rows (evaluation is timed apart from the
steps), and the same over the wall time of ``fit``.

Prints one JSON line per figure; with ``$OUT`` (or ``--out``) also writes ``eval_gen.json`` there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_generate(tiny: bool, batches: list[int], prompt: int, new: int, repeat: int) -> list[dict[str, Any]]:
    """Tokens/s of ``FM9GModel.generate`` per batch size (module docstring)."""
    import torch

    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from run import TINY_SHAPE

    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    mc = FM9GConfig(**TINY_SHAPE) if tiny else FM9GConfig.from_name("fm9g-7b")
    torch.manual_seed(0)
    with torch.device(device):
        model = FM9GModel(mc).to(dtype).eval()
    out = []
    for b in batches:
        ids = torch.randint(3, mc.vocab_size, (b, prompt), device=device)
        model.generate(ids, 4)  # warm-up (kernels, allocator)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, prefill = [], []
        for _ in range(repeat):
            _sync(device)
            t0 = time.perf_counter()
            model.generate(ids, 1)
            _sync(device)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            res = model.generate(ids, new)
            _sync(device)
            times.append(time.perf_counter() - t0)
            assert res.shape == (b, prompt + new)
        dt = statistics.median(times)
        out.append(dict(figure="generate", shape="tiny" if tiny else "fm9g-7b", dtype=str(dtype).replace("torch.", ""),
                        batch=b, prompt=prompt, new_tokens=new, tokens_per_s=round(b * new / dt, 1),
                        ms_per_step=round(1000 * dt / new, 2), prefill_ms=round(1000 * statistics.median(prefill), 1),
                        peak_mem_GB=round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None))
    return out


def bench_eval(tiny: bool, steps: int, eval_iters: int, eval_tokens: int, work: Path) -> dict[str, Any]:
    """W1 with evaluation every ``eval_iters`` steps: the share of time evaluation takes."""
    from fm9g.training.metrics import read_train_stats
    from fm9g.training.trainer import Trainer
    from run import _shape, build_data, train_config

    spec = dict(tiny=tiny, workload="W1", scale="", work=str(work), steps=steps, warmup=0, name="W1", variant="base")
    mc, (row, doc_len, _) = _shape(spec)
    held_docs = max(2, eval_tokens // doc_len)
    n_docs = (row // doc_len) * steps + 8 + held_docs
    tok, data = build_data(work / "data", mc.vocab_size, doc_len, n_docs)
    cfg = train_config(spec, mc, data, {}).override({
        "eval_iters": eval_iters, "eval_split": held_docs / n_docs, "eval_tokens": eval_tokens})
    trainer = Trainer(cfg, tokenizer=tok)
    t0 = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - t0
    rows = read_train_stats(work / "runs" / "bench" / "train_stats")
    train_s = sum(r["iter_time"] for r in rows)
    eval_s = sum(r.get("eval_time") or 0.0 for r in rows)
    hist = trainer.evaluator.history
    return dict(figure="eval_cost", workload="W1" + (" (tiny)" if tiny else ""), steps=len(rows), eval_iters=eval_iters,
                evaluations=len(hist), eval_tokens_each=hist[-1].tokens if hist else 0,
                eval_s_total=round(eval_s, 2), train_step_s_total=round(train_s, 2),
                eval_fraction_of_step_time=round(eval_s / max(train_s, 1e-9), 4),
                eval_fraction_of_fit=round(eval_s / max(fit_s, 1e-9), 4), fit_s=round(fit_s, 1),
                eval_losses=[round(e.loss, 4) for e in hist])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="+", choices=["gen", "eval"])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny shapes, few steps")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; tiny 16)")
    ap.add_argument("--new", type=int, default=None, help="generated tokens (default 128; tiny 8)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="W1 steps (default 300; tiny 4)")
    ap.add_argument("--eval-iters", type=int, default=None, help="default 100; tiny 2")
    ap.add_argument("--eval-tokens", type=int, default=None, help="held-out row tokens per evaluation (default 262144; tiny 512)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    t = args.tiny
    results: list[dict[str, Any]] = []
    if "gen" in args.what:
        results += bench_generate(t, [int(b) for b in args.batches.split(",")], args.prompt or (16 if t else 128),
                                  args.new or (8 if t else 128), args.repeat)
    if "eval" in args.what:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(bench_eval(t, args.steps or (4 if t else 300), args.eval_iters or (2 if t else 100),
                                      args.eval_tokens or (512 if t else 262144), Path(tmp)))
    for r in results:
        print(json.dumps(r))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "eval_gen.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
