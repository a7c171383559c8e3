"""W1 (BENCHMARKS.md): full fine-tune of a 1.5B FM9G-shaped model on one GPU with fm9g's own Trainer.

Shape: vocab 73448, d 2048, 24 layers, 16 heads (MHA, dh 128), ff 5504, untied head, q/k/v bias
(the baseline's Qwen2 has them). One packed 4096-token row of 4 documents x 1024 per step
(cu_seqlens, positions restarting per document); bf16 autocast with fp32 master weights, fused
AdamW (torch engine); median of --steps steps after --warmup warm-ups. Every step goes through
``Trainer.train_step`` (schedule, engine forward/backward/clip/step), not a hand-written loop.

MFU = tokens/s x (6·N + 12·L·H·dh·S) / 989e12 with N = parameters except the input embedding.

Run variants in one process (each builds a fresh model), and the HF baseline in the same run:

    python benchmarks/train_gpu.py --variants eager,compile,compile+ckpt --baseline
    python benchmarks/train_gpu.py --variants compile --attn-impl flash_attn

A variant is ``+``-joined flags: ``eager``, ``compile`` (torch.compile each layer), ``compilefull``
(torch.compile the whole model), ``ckpt`` (activation checkpointing), ``attn=<backend>`` (sdpa |
flex | torch_varlen | flash_attn | flash_attn_4 | auto), ``chunk=<tokens>`` (tokens per chunk of the model's
chunked linear + cross-entropy), e.g. ``compile+attn=flash_attn+chunk=1024``.
Prints one JSON object per variant.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK = 989e12
SEQ, DOCS = 4096, 4
SHAPE = dict(vocab_size=73448, dim_model=2048, num_layers=24, num_heads=16, num_kv_heads=16, dim_head=128,
             dim_ff=5504, tie_lm_head=False, qkv_bias=True, scale=False, scale_depth=-1.0, base=1e6,
             max_length=SEQ, init_std=0.02, use_checkpoint=False)


def packed_batch(vocab: int, device: str) -> dict:
    """One row of SEQ tokens = DOCS documents, as fm9g's Packer emits it."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, SEQ), generator=g)
    doc = SEQ // DOCS
    labels = torch.roll(ids, -1, 1)
    labels[0, doc - 1::doc] = -100  # no target across a document boundary
    return {
        "input_ids": ids.to(device), "labels": labels.to(device),
        "position_ids": torch.arange(doc).repeat(DOCS)[None].to(device),
        "cu_seqlens": torch.arange(0, SEQ + 1, doc, dtype=torch.int32).to(device),
        "max_seqlen": doc, "num_tokens": SEQ, "num_label_tokens": int((labels != -100).sum()),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_fm9g(variant: str, steps: int, warmup: int, default_attn: str, device: str = "cuda") -> dict:
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.training.config import TrainConfig
    from fm9g.training.metrics import flops_per_token
    from fm9g.training.trainer import Trainer

    flags = set(variant.split("+"))
    attn = next((f.split("=", 1)[1] for f in flags if f.startswith("attn=")), default_attn)
    torch.manual_seed(0)
    mcfg = FM9GConfig(**SHAPE, attn_impl=attn)
    with torch.device(device):
        model = FM9GModel(mcfg)  # fp32 master weights
    cfg = TrainConfig(model=mcfg, lr=1e-5, lr_scheduler="constant", warmup_iters=0, train_iters=10**6,
                      max_length=SEQ, batch_size=1, save=None, tensorboard=None, stats_dir=None, progress_bar=False,
                      device=device, precision="bf16" if device == "cuda" else "fp32", compile="compile" in flags, use_checkpoint="ckpt" in flags,
                      attn_impl=attn, inspect_iters=0)
    chunk = next((int(f.split("=", 1)[1]) for f in flags if f.startswith("chunk=")), None)
    if chunk is not None and hasattr(model, "loss_chunk_tokens"):
        model.loss_chunk_tokens = chunk  # tokens per chunk of the fused linear + cross-entropy
    if "compilefull" in flags:
        model.compile()  # the whole model as one graph (in place: state-dict names unchanged)
    trainer = Trainer(cfg, model=model, loader=[])
    batch = packed_batch(mcfg.vocab_size, device)
    fpt = flops_per_token(model, SEQ)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        out = trainer.train_step([batch])
        _sync(device)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[warmup:])
    tps = SEQ / dt
    n = sum(p.numel() for p in model.parameters())
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    res = dict(kind="fm9g", variant=variant, attn=model.attention_backend(torch.device(device), dtype),
               params_B=round(n / 1e9, 3), tokens_per_s=round(tps), mfu=round(tps * fpt / PEAK, 4),
               peak_mem_GB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
               step_s=round(dt, 4), loss=round(out.loss, 3), skipped=out.skipped, times=[round(x, 4) for x in times])
    del trainer, model
    return res


def run_hf_baseline(steps: int, warmup: int) -> dict:
    """BENCHMARKS.md's baseline: transformers Qwen2 (sdpa), same shape and packed row, fused AdamW."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=73448, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, rope_theta=1e6, tie_word_embeddings=False,
                      max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).to("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), device="cuda")
    pos = torch.arange(SEQ // DOCS, device="cuda").repeat(DOCS)[None]
    n = sum(p.numel() for p in model.parameters())
    fpt = 6 * (n - cfg.vocab_size * cfg.hidden_size) + 12 * 24 * 16 * 128 * SEQ
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, position_ids=pos, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[warmup:])
    tps = SEQ / dt
    res = dict(kind="hf_baseline", params_B=round(n / 1e9, 3), tokens_per_s=round(tps), mfu=round(tps * fpt / PEAK, 4),
               peak_mem_GB=round(torch.cuda.max_memory_allocated() / 2**30, 2), step_s=round(dt, 4))
    del model, opt
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="eager,compile", help="comma-separated variants (see above)")
    ap.add_argument("--attn-impl", default="auto", help="default attention backend for variants without attn=")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--baseline", action="store_true", help="also run the HF transformers baseline (same process)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU, 2 steps: checks the script runs")
    args = ap.parse_args()
    if args.cpu_smoke:
        global SEQ
        SEQ = 256
        SHAPE.update(vocab_size=512, dim_model=64, num_layers=2, num_heads=4, num_kv_heads=4, dim_head=16, dim_ff=128,
                     max_length=SEQ)
        r = run_fm9g(args.variants.split(",")[0], 2, 1, "sdpa", device="cpu")
        print(json.dumps(r))
        return 0 if r["skipped"] is None else 1
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA GPU"}))
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    jobs = [("fm9g", v.strip()) for v in args.variants.split(",") if v.strip()]
    if args.baseline:
        jobs.append(("hf", "baseline"))
    for kind, variant in jobs:
        try:
            r = run_fm9g(variant, args.steps, args.warmup, args.attn_impl) if kind == "fm9g" else run_hf_baseline(args.steps, args.warmup)
        except torch.cuda.OutOfMemoryError:
            r = dict(kind=kind, variant=variant, error="out of memory")
        except Exception as err:  # report and go on with the next variant
            r = dict(kind=kind, variant=variant, error=f"{type(err).__name__}: {err}"[:2000])
        r.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
        print(json.dumps(r), flush=True)
        results.append(r)
        gc.collect()
        torch.cuda.empty_cache()
    base = next((r for r in results if r["kind"] == "hf_baseline" and "tokens_per_s" in r), None)
    if base:
        for r in results:
            if r["kind"] == "fm9g" and "tokens_per_s" in r:
                print(json.dumps({"variant": r["variant"], "speedup_vs_hf": round(r["tokens_per_s"] / base["tokens_per_s"], 3),
                                  "mfu": r["mfu"], "peak_mem_GB": r["peak_mem_GB"]}), flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
