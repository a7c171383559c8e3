"""Does ``optimizer="adamw_bf16"`` learn like fp32 AdamW? Loss curves on real text, through Trainer.fit.

Each variant pretrains the same FM9G from the same seed on the same data (the Python standard
library as text, as examples/pretrain.py: source files and docstrings mixed 85 / 15 by
MixtureLoader, a byte-level BPE trained on it) and prints its loss curve:

* ``adamw``: the default, fp32 master weights and moments (under bf16 precision: bf16 autocast);
* ``adamw_bf16``: weights, gradients and moments in bf16, stochastically rounded updates;
* ``bf16_nearest``: the same but rounding every update to the *nearest* bf16 value (the ablation
  that shows why the rounding is stochastic; not a user option).

    python benchmarks/optimizer_precision.py --steps 300                  # CPU: a 5M model, ~25 min
    python benchmarks/optimizer_precision.py --steps 300 --seeds 1 2 3 --variants adamw adamw_bf16
    python benchmarks/optimizer_precision.py --gpu --steps 600            # one GPU: a 110M model

On a CPU this machine's bf16 matmuls are ~50x slower than fp32, so there the model computes in
fp32 and ``adamw_bf16`` keeps its fp32 weights on the bf16 grid (the optimizer's numerics exactly,
without the memory saving or the bf16 gradients). On a GPU the comparison is the real one: bf16
compute for all, fp32 masters against bf16 weights and gradients.

Prints one JSON line per variant (losses every step, the mean of each tenth of the run) and a
table of the tenths' means relative to ``adamw``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

VARIANTS = ("adamw", "adamw_bf16", "bf16_nearest")


def prepare(work: Path) -> None:
    from _gpu import train_tokenizer, write_stdlib_corpus

    from fm9g import build_index

    if (work / "mix.json").exists():
        return
    write_stdlib_corpus(work / "raw")
    train_tokenizer([work / "raw" / "docs.jsonl", work / "raw" / "code.jsonl"], work / "tokenizer")
    build_index(work / "raw" / "code.jsonl", work / "index" / "code", language="code", overwrite=True)
    build_index(work / "raw" / "docs.jsonl", work / "index" / "docs", language="en", overwrite=True)
    (work / "mix.json").write_text(json.dumps([
        {"dataset_name": "stdlib_code", "task_name": "code", "path": str(work / "index" / "code"), "abs_weight": 0.85},
        {"dataset_name": "stdlib_docs", "task_name": "docs", "path": str(work / "index" / "docs"), "abs_weight": 0.15},
    ]))


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """One variant in this process (the caller starts a process per variant)."""
    import torch

    from fm9g import FM9GConfig, TrainConfig, Trainer
    from fm9g.training import optimizers

    if variant == "bf16_nearest":  # the ablation: every update rounded to the nearest bf16 value
        optimizers.round_stochastic = lambda x, key: x.to(torch.bfloat16)
    work = Path(args.work)
    gpu = args.gpu
    dim, layers, rows, length = (768, 12, 16, 1024) if gpu else (256, 4, 8, 256)
    model = FM9GConfig(vocab_size=8192, dim_model=dim, num_layers=layers, num_heads=dim // 64, num_kv_heads=dim // 64,
                       dim_ff=dim * 3, tie_lm_head=True, max_length=length, use_checkpoint=False)
    cfg = TrainConfig(
        model=model, tokenizer_path=str(work / "tokenizer"), data=str(work / "mix.json"),
        device="cuda" if gpu else "cpu", precision="bf16" if gpu else "fp32",
        optimizer="adamw" if variant == "adamw" else "adamw_bf16", compile=gpu,
        lr=args.lr, lr_scheduler="warmupstabledrop", warmup_iters=0.05, drop_iters=0.2, weight_decay=0.1,
        train_iters=args.steps, batch_size=rows, max_length=length, seed=args.seed, save=None, tensorboard=None,
        stats_dir=None, log_iters=max(1, args.steps // 10), inspect_iters=0, progress_bar=False, num_workers=1,
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    params = sum(p.numel() for p in trainer.model.parameters())
    res = trainer.fit()
    n = len(res.losses)
    tenths = [sum(res.losses[i * n // 10:(i + 1) * n // 10]) / max(1, (i + 1) * n // 10 - i * n // 10)
              for i in range(10)]
    return {"variant": variant, "seed": args.seed, "device": "cuda" if gpu else "cpu", "params_m": round(params / 1e6, 2),
            "lr": args.lr, "steps": n, "tokens": res.tokens,
        "seconds": round(time.perf_counter() - t0, 1), "tenths": tenths, "losses": res.losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234],
                    help="one run per seed and variant (the seed sets the initial weights, the data order and the rounding noise)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--work", default="/tmp/fm9g-optimizer-precision")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", help="also write the JSON lines to this file")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant here
    args = ap.parse_args()
    if args.one:
        args.seed = args.seeds[0]
        print("RESULT " + json.dumps(run_variant(args.one, args)), flush=True)
        return
    prepare(Path(args.work))
    results = []
    for seed, v in [(seed, v) for seed in args.seeds for v in args.variants]:
        cmd = [sys.executable, __file__, "--one", v, "--steps", str(args.steps), "--lr", str(args.lr),
               "--work", args.work, "--seeds", str(seed)] + (["--gpu"] if args.gpu else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"variant {v} failed:\n{out.stderr[-4000:]}")
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):]
        results.append(json.loads(line))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    print("\n| seed | variant | " + " | ".join(f"tenth {i + 1}" for i in range(10)) + " | last tenth vs adamw |")
    print("|---|---|" + "---|" * 11)
    for r in results:
        ref = next((x for x in results if x["variant"] == "adamw" and x.get("seed") == r.get("seed")), None)
        gap = "" if ref is None else f"{(r['tenths'][-1] - ref['tenths'][-1]) / ref['tenths'][-1]:+.2%}"
        print(f"| {r.get('seed')} | {r['variant']} | " + " | ".join(f"{x:.3f}" for x in r["tenths"]) + f" | {gap} |")


if __name__ == "__main__":
    main()
