"""W3 (BENCHMARKS.md): full fine-tune of the fm9g-7b preset on ONE GPU capped at 80 GB, bmtrain engine.

16 rows x 4096 tokens per optimizer step (batch_size 1 x grad_accum 16), bf16 parameters with
fp32 master weights and Adam moments in host memory (``offload=True``, bmtrain's
AdamOffloadOptimizer), activation checkpointing per layer, the packed varlen attention backend
chosen by ``attn_impl="auto"``. Every step goes through ``Trainer(config).fit()`` over a real
index: random-word documents tokenized by a small trained BPE (built here, offline), indexed with
``build_index`` and read by the MixtureLoader. A LoRA run of the same 7B under bmtrain follows for
comparison. Each run is its own subprocess (its own peak host RSS).

Prints one JSON line per run: tokens/s (median over the steps after the first), MFU
(= tokens/s x (6·N + 12·L·H·dh·S) / 989e12, N = parameters except the input embedding), peak
GPU memory (allocated and reserved), host peak RSS, step times.

    python benchmarks/bmtrain_w3.py --steps 4            # full fine-tune, then LoRA
    python benchmarks/bmtrain_w3.py --steps 4 --runs full
    python benchmarks/bmtrain_w3.py --steps 4 --runs full,full-bf16,lora,lora-torch   # both engines side by side

``full-bf16`` is the path without offload: the torch engine with ``optimizer="adamw_bf16"`` keeps
bf16 weights, gradients and moments on the GPU (8 bytes per parameter, 61 GB for the 7B).
``lora-torch`` is the LoRA run of the same settings under the torch engine.

Needs bmtrain (``bash scripts/install_bmtrain.sh``) and a GPU with >= 80 GB and ~120 GB of host memory.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

PEAK = 989e12
RUNS = {  # --runs names
    "full": "full FT, bmtrain + AdamOffloadOptimizer (fp32 master weights and moments in host memory)",
    "lora": "LoRA r16, bmtrain",
    "full-bf16": "full FT, torch engine + optimizer adamw_bf16 (bf16 weights, gradients, moments on the GPU)",
    "lora-torch": "LoRA r16, torch engine",
}
SEQ, ROWS = 4096, 16
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["project_q", "project_k", "project_v", "w_0", "w_1", "w_out"]}


def build_data(work: Path, tokens_needed: int) -> tuple[Path, Path]:
    """A toy BPE tokenizer and a one-dataset mixture over random-word documents (>= tokens_needed)."""
    from _toy import make_toy_tokenizer

    from fm9g import build_index

    tok = make_toy_tokenizer(work / "tok")
    rng = random.Random(0)
    words = ["harbour", "tower", "canal", "bread", "stone", "oven", "temple", "trident", "white", "wide",
             "great", "kelp", "model", "train", "data", "token", "layer", "block", "river", "city"]
    src = work / "text.jsonl"
    n_words = 0
    with open(src, "w", encoding="utf-8") as f:
        while n_words < tokens_needed:  # about one token per word or more
            doc = " ".join(rng.choice(words) for _ in range(rng.randint(200, 1500)))
            n_words += doc.count(" ") + 1
            f.write(json.dumps({"input": "", "output": doc}) + "\n")
    build_index(src, work / "idx", language="en")
    mix = work / "mix.json"
    mix.write_text(json.dumps([{"dataset_name": "text", "task_name": "text", "path": "idx", "abs_weight": 1.0}]))
    return tok, mix


def run_one(kind: str, steps: int, cap_gb: float, work: Path) -> dict:
    """One run in this process: ``kind`` is one of RUNS."""
    import torch

    from fm9g.training.config import TrainConfig
    from fm9g.training.trainer import Trainer

    total = torch.cuda.get_device_properties(0).total_memory
    if cap_gb * 1e9 < total:
        torch.cuda.set_per_process_memory_fraction(cap_gb * 1e9 / total)
    tok, mix = build_data(work, tokens_needed=int(SEQ * ROWS * (steps + 2) * 1.2))
    torch_engine = kind in ("full-bf16", "lora-torch")
    cfg = TrainConfig(
        model="fm9g-7b", tokenizer_path=str(tok), data=str(mix), engine="torch" if torch_engine else "bmtrain",
        offload=(kind == "full"), optimizer="adamw_bf16" if kind == "full-bf16" else "adamw",
        precision="bf16", use_checkpoint=True, batch_size=1, grad_accum=ROWS, max_length=SEQ, train_iters=steps,
        lr=1e-5, warmup_iters=1, lr_scheduler="cosine", save=str(work / "ckpt"), save_iters=0, save_final=False,
        tensorboard=None, stats_dir=None, progress_bar=False, inspect_iters=0, log_iters=1, seed=1,
        lora=LORA if kind.startswith("lora") else None, lora_random_base=True,  # a speed run: no pretrained base needed
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log_stream=sys.stderr)
    setup_s = time.perf_counter() - t0
    eng = trainer.engine
    times: list[float] = []
    tokens: list[int] = []
    inner = eng.train_step

    def timed(batches, lr):
        torch.cuda.synchronize()
        s = time.perf_counter()
        out = inner(batches, lr)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
        tokens.append(out.num_tokens)
        return out

    eng.train_step = timed
    torch.cuda.reset_peak_memory_stats()
    res = trainer.fit()
    steady = list(zip(times, tokens))[1:] or list(zip(times, tokens))
    tps = statistics.median(n / s for s, n in steady)
    fpt = trainer.flops_per_token
    return {
        "run": f"W3 fm9g-7b {RUNS[kind]}", "kind": kind,
        "gpu": torch.cuda.get_device_name(0), "cap_gb": cap_gb, "rows_x_tokens": f"{ROWS}x{SEQ}",
        "steps": len(times), "tokens_per_s": round(tps, 1), "mfu": round(tps * fpt / PEAK, 4),
        "step_s": [round(s, 2) for s in times], "losses": [round(x, 4) for x in res.losses],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "setup_s": round(setup_s, 1), "params": sum(p.numel() for p in trainer.model.parameters()),
        "attention": trainer.model.attention_backend(torch.device("cuda"), torch.bfloat16),
        "cudnn_enabled": torch.backends.cudnn.enabled, "flops_per_token": fpt,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--runs", default="full,lora", help="comma list of: " + ", ".join(RUNS))
    ap.add_argument("--cap-gb", type=float, default=80.0, help="GPU memory cap in GB (1e9 bytes)")
    ap.add_argument("--one", choices=list(RUNS), help=argparse.SUPPRESS)  # a run in this process
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(prefix="w3-") as d:
            print("W3RESULT " + json.dumps(run_one(args.one, args.steps, args.cap_gb, Path(d))), flush=True)
        return
    for kind in [r.strip() for r in args.runs.split(",") if r.strip()]:
        cmd = [sys.executable, __file__, "--one", kind, "--steps", str(args.steps), "--cap-gb", str(args.cap_gb)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("W3RESULT ")]
        if proc.returncode != 0 or not lines:
            why = "killed (host out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
            print(json.dumps({"run": kind, "error": why}), flush=True)
            continue
        print(lines[-1][len("W3RESULT "):], flush=True)


if __name__ == "__main__":
    main()
