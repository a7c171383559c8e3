"""LoRA training-step benchmark: fm9g-7b in bf16 on one GPU, with and without activation checkpointing.

One step = forward + backward + AdamW on the LoRA parameters, for one packed row of
``--seq`` tokens holding ``--docs`` documents of equal length (default 4096 = 4 × 1024), LoRA
r 64 / alpha 32 on all 7 projections (the ``fm9g-7b`` LoRA preset). The 7B base is built directly
in bf16 on the GPU (no fp32 copy); LoRA parameters are fp32 (the default of ``apply_lora``).

Run from the repository root (the lead runs it on the H100)::

    python benchmarks/lora_gpu.py                     # both checkpointing modes, prints JSON
    python benchmarks/lora_gpu.py --out benchmarks/results_lora.json
    python benchmarks/lora_gpu.py --model tiny --device cpu --seq 256 --steps 1 --warmup 0   # smoke test

Prints one JSON object: settings, and per mode ``tokens_per_s``, ``step_time_s`` (mean / min over
the timed steps), ``peak_memory_gib`` (``torch.cuda.max_memory_allocated``), the loss, and the
trainable / total parameter counts.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fm9g.models.config import FM9GConfig  # noqa: E402
from fm9g.models.fm9g import FM9GModel  # noqa: E402
from fm9g.models.lora import LoraConfig, apply_lora, count_parameters, trainable_parameters  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(name: str, device: torch.device, dtype: torch.dtype, attn_impl: str) -> FM9GModel:
    """FM9GModel created directly in `dtype` on `device` (random init; no fp32 copy anywhere)."""
    cfg = FM9GConfig.from_name(name, attn_impl=attn_impl)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FM9GModel(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def make_batch(vocab: int, seq: int, docs: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """One packed row: `docs` documents of seq/docs tokens, positions restarting per document."""
    if seq % docs:
        raise SystemExit(f"--seq {seq} is not a multiple of --docs {docs}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    doc_len = seq // docs
    labels = ids.roll(-1, dims=1).clone()
    labels[:, doc_len - 1::doc_len] = -100  # last token of each document predicts nothing
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "position_ids": (torch.arange(seq) % doc_len).view(1, seq).to(device),
        "cu_seqlens": torch.arange(0, seq + 1, doc_len, dtype=torch.int32).to(device),
    }


def run_mode(model: FM9GModel, batch: dict[str, torch.Tensor], *, checkpointing: bool,
             steps: int, warmup: int, device: torch.device) -> dict:
    model.set_activation_checkpointing(checkpointing)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    loss_value = float("nan")
    for step in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        out = model(batch["input_ids"], position_ids=batch["position_ids"],
                    cu_seqlens=batch["cu_seqlens"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        loss_value = float(out.loss.detach())
        if step >= warmup:
            times.append(dt)
    tokens = batch["input_ids"].numel()
    median = statistics.median(times)
    result = {
        "activation_checkpointing": checkpointing,
        "step_time_s": round(median, 4),  # median, as the HF baseline
        "step_time_min_s": round(min(times), 4),
        "tokens_per_s": round(tokens / median, 1),
        "loss": round(loss_value, 4),
        "timed_steps": len(times),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    del opt
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fm9g-7b", help="FM9GConfig preset (default fm9g-7b)")
    p.add_argument("--lora", default="fm9g-7b", help="LoraConfig preset (default fm9g-7b: r 64, alpha 32, all 7)")
    p.add_argument("--seq", type=int, default=4096, help="tokens in the packed row")
    p.add_argument("--docs", type=int, default=4, help="documents in the row (equal lengths)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode (as the HF baseline)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (as the HF baseline)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer layer (after LoRA)")
    p.add_argument("--modes", default="off,on", help="activation checkpointing modes to run: off,on")
    p.add_argument("--attn-impl", default="auto", help="attention backend (auto, flash_attn_4, flash_attn, torch_varlen, flex, sdpa)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: run on the GPU machine, or pass --model tiny --device cpu", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = build_model(args.model, device, dtype, args.attn_impl)
    lora_cfg = LoraConfig.from_name(args.lora)
    apply_lora(model, lora_cfg)
    if args.compile:
        for layer in model.encoder.layers:
            layer.compile()
    model.train()
    _sync(device)
    build_s = time.perf_counter() - t0
    counts = count_parameters(model)
    report: dict = {
        "benchmark": "lora_step",
        "model": args.model,
        "lora": lora_cfg.to_dict(),
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "attention_backend": model.attention_backend(device, dtype),
        "compile": args.compile,
        "seq": args.seq,
        "docs": args.docs,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "build_s": round(build_s, 1),
        "results": [],
    }
    if device.type == "cuda":
        report["weights_memory_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    batch = make_batch(model.config.vocab_size, args.seq, args.docs, device)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("on", "off"):
            raise SystemExit(f"--modes takes 'on' and/or 'off', got {mode!r}")
        try:
            res = run_mode(model, batch, checkpointing=mode == "on", steps=args.steps,
                           warmup=args.warmup, device=device)
        except torch.OutOfMemoryError as e:  # record and go on with the other mode
            res = {"activation_checkpointing": mode == "on", "error": f"OOM: {str(e).splitlines()[0]}"}
            for p_ in trainable_parameters(model):
                p_.grad = None
            gc.collect()
            torch.cuda.empty_cache()
        report["results"].append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        tmp = f"{args.out}.tmp{os.getpid()}"
        Path(tmp).write_text(text + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
