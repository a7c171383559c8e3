"""Does ``fp8`` learn like bf16, and ``adamw_master`` like ``adamw``? Loss curves on real text,
through ``Trainer.fit`` (issue 29, items 2 and 4).

Two comparisons, each from the same seed on the same data (the Python standard library as text, as
examples/pretrain.py: source files and docstrings mixed 85 / 15 by MixtureLoader, a byte-level BPE
trained on them):

* ``full``: pretraining a model of about 110M parameters (768 wide, 12 layers) in bf16 and with
  ``fp8`` (torchao's float8 training: every decoder linear, weights trained);
* ``lora``: LoRA (r 16, the seven projections) on the bf16 run's final weights, over the docstrings
  alone, in bf16 and with ``fp8`` (the frozen base on FP8 copies made once, the branch in bf16);
* ``--optimizers adamw_master``: the bf16 pretraining again with that optimizer (bf16 compute
  weights, residual stream and gradients against fp32 masters), against the default ``adamw``
  (fp32 weights under bf16 autocast): what decides the default optimizer.

    python benchmarks/fp8_quality.py --steps 1000 --lora-steps 300          # one FP8 GPU, ~5 minutes
    python benchmarks/fp8_quality.py --recipes tensorwise rowwise --out q.jsonl
    python benchmarks/fp8_quality.py --kinds full --recipes --optimizers adamw_master   # the optimizers alone
    python benchmarks/fp8_quality.py --tiny                                 # CPU smoke (fp32, no FP8)

Each run is a process of its own. Prints one JSON line per run (losses every step, the mean of
each tenth) and a table of the last tenth's mean against bf16; the issue's bar is within 1 %.
``--tiny`` checks the plumbing on a CPU: a 2-layer model, a few steps, ``fp8`` off (CPUs have no
FP8 tensor cores), so its "fp8" rows are bf16 runs under another name.
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


def prepare(work: Path, tiny: bool) -> None:
    """The corpus, its tokenizer and two indexes, and the mixtures (``mix.json``, ``docs.json``)."""
    from _gpu import train_tokenizer, write_stdlib_corpus

    from fm9g import build_index

    if (work / "mix.json").exists():
        return
    write_stdlib_corpus(work / "raw")
    train_tokenizer([work / "raw" / "docs.jsonl", work / "raw" / "code.jsonl"], work / "tokenizer",
                    max_chars=400_000 if tiny else 4_000_000)
    for name, language in (("code", "code"), ("docs", "en")):
        build_index(work / "raw" / f"{name}.jsonl", work / "index" / name, language=language, overwrite=True)
    code = {"dataset_name": "stdlib_code", "task_name": "code", "path": str(work / "index" / "code"), "abs_weight": 0.85}
    docs = {"dataset_name": "stdlib_docs", "task_name": "docs", "path": str(work / "index" / "docs"), "abs_weight": 0.15}
    (work / "mix.json").write_text(json.dumps([code, docs]))
    (work / "docs.json").write_text(json.dumps([dict(docs, abs_weight=1.0)]))


def run(kind: str, recipe: str | bool, optimizer: str, args: argparse.Namespace) -> dict:
    """One run in this process: ``kind`` full or lora, ``recipe`` False (bf16) or an fp8 recipe."""
    import torch

    from fm9g import FM9GConfig, LoraConfig, TrainConfig, Trainer

    work, gpu = Path(args.work), not args.tiny
    dim, layers, rows, length = (768, 12, 8, 1024) if gpu else (64, 2, 4, 128)
    model = FM9GConfig(vocab_size=8192, dim_model=dim, num_layers=layers, num_heads=dim // 64 or 1,
                       num_kv_heads=dim // 64 or 1, dim_ff=dim * 3, tie_lm_head=True, max_length=length,
                       use_checkpoint=False)
    lora = kind == "lora"
    steps = args.lora_steps if lora else args.steps
    cfg = TrainConfig(
        model=model, tokenizer_path=str(work / "tokenizer"), data=str(work / ("docs.json" if lora else "mix.json")),
        device="cuda" if gpu else "cpu", precision="bf16" if gpu else "fp32", compile=gpu, fp8=recipe if gpu else False,
        optimizer=optimizer,
        pretrained_model=str(work / "base.pt") if lora else None,
        lora=LoraConfig(r=16, alpha=32, dropout=0.0) if lora else None,
        lr=args.lora_lr if lora else args.lr, lr_scheduler="warmupstabledrop", warmup_iters=0.05, drop_iters=0.2,
        weight_decay=0.1, train_iters=steps, batch_size=rows, max_length=length, seed=args.seed, save=None,
        tensorboard=None, stats_dir=None, log_iters=max(1, steps // 10), inspect_iters=0, progress_bar=False,
        num_workers=1,
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    res = trainer.fit()
    if kind == "full" and recipe is False and optimizer == "adamw":  # the LoRA runs' base
        state = {k: v.detach().float().cpu() for k, v in trainer.engine.model_state_dict().items()}
        torch.save(state, work / "base.pt")
    n = len(res.losses)
    tenths = [sum(res.losses[i * n // 10:(i + 1) * n // 10]) / max(1, (i + 1) * n // 10 - i * n // 10) for i in range(10)]
    return {"kind": kind, "fp8": recipe, "optimizer": optimizer, "seed": args.seed, "steps": n, "tokens": res.tokens,
            "seconds": round(time.perf_counter() - t0, 1), "tenths": tenths, "losses": res.losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="pretraining steps (8 x 1024 tokens each)")
    ap.add_argument("--lora-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--recipes", nargs="*", default=["tensorwise"], choices=["tensorwise", "rowwise"])
    ap.add_argument("--optimizers", nargs="*", default=[], choices=["adamw_master", "adamw_bf16"],
                    help="bf16 pretraining runs with these optimizers too, against adamw")
    ap.add_argument("--kinds", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny model, fp8 off")
    ap.add_argument("--work", default="/tmp/fm9g-fp8-quality")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "kind:recipe:optimizer", run here
    args = ap.parse_args()
    if args.tiny:
        args.steps, args.lora_steps = min(args.steps, 6), min(args.lora_steps, 4)
    if args.one:
        kind, recipe, optimizer = args.one.split(":")
        print("RESULT " + json.dumps(run(kind, recipe if recipe != "bf16" else False, optimizer, args)), flush=True)
        return
    prepare(Path(args.work), args.tiny)
    # the bf16 pretraining first (the LoRA runs' base), then the LoRA pair, then the other full runs
    runs = [("full", "bf16", "adamw")] * ("full" in args.kinds or not (Path(args.work) / "base.pt").exists())
    runs += [("lora", r, "adamw") for r in ["bf16", *args.recipes] if "lora" in args.kinds]
    runs += [("full", r, "adamw") for r in args.recipes if "full" in args.kinds]
    runs += [("full", "bf16", o) for o in args.optimizers if "full" in args.kinds]
    results = []
    for kind, recipe, optimizer in runs:
        cmd = [sys.executable, __file__, "--one", f"{kind}:{recipe}:{optimizer}", "--work", args.work, "--steps", str(args.steps),
               "--lora-steps", str(args.lora_steps), "--lr", str(args.lr), "--lora-lr", str(args.lora_lr),
               "--seed", str(args.seed)] + ["--tiny"] * args.tiny
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"run {kind}:{recipe}:{optimizer} failed:\n{out.stderr[-4000:]}")
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):]
        results.append(json.loads(line))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    print("\n| run | fp8 | optimizer | steps | seconds | " + " | ".join(f"tenth {i + 1}" for i in range(10)) + " | last tenth vs bf16 adamw |")
    print("|---|---|---|---|---|" + "---|" * 11)
    for r in results:
        ref = next(x for x in results if x["kind"] == r["kind"] and x["fp8"] is False and x["optimizer"] == "adamw")
        gap = (r["tenths"][-1] - ref["tenths"][-1]) / ref["tenths"][-1]
        if r["kind"] not in args.kinds:
            continue
        print(f"| {r['kind']} | {r['fp8'] or 'bf16'} | {r['optimizer']} | {r['steps']} | {r['seconds']} | "
              + " | ".join(f"{x:.3f}" for x in r["tenths"]) + f" | {gap:+.2%} |")


if __name__ == "__main__":
    main()
