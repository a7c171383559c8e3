"""GPU checks and measurements for the FM9G model (prints one JSON object per line).

    python benchmarks/model_gpu.py                 # on a CUDA machine (H100: all parts)
    python benchmarks/model_gpu.py --smoke         # tiny sizes on CPU: exercises the code paths
    python benchmarks/model_gpu.py --parts a,c     # a subset

Parts (each in its own try/except, so one failure does not stop the others):
  a  every available attention backend against `sdpa` on packed rows: forward output and q/k/v
     gradients, fp32 and bf16 (max abs diffs), plus a small model's logits / loss / grads per backend,
     and a fwd+bwd timing of each backend at the 7B attention shape.
  b  bf16 forward+backward of the `fm9g-7b` preset on one 4096-token packed row (4 documents), with
     activation checkpointing on and off: step time, tokens/s, peak memory.
  c  the loss of a 32k-token row with vocab 73448 (d 2048, 2 layers): chunked loss vs naive
     full-logits fp32 cross-entropy, peak memory of each (model-level and head-only).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fm9g.models.attention import ATTENTION_BACKENDS, backend_status  # noqa: E402
from fm9g.models.config import FM9GConfig  # noqa: E402
from fm9g.models.fm9g import FM9GModel, chunked_cross_entropy  # noqa: E402


def emit(**record: Any) -> None:
    print(json.dumps(record, default=str), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None


def alloc_gib(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 3) if device.type == "cuda" else None


def packed_cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def run_part(name: str, fn: Callable[[], None]) -> None:
    t0 = time.time()
    try:
        fn()
        emit(part=name, status="ok", seconds=round(time.time() - t0, 1))
    except Exception as err:  # noqa: BLE001 - report and continue with the next part
        emit(part=name, status="error", error=f"{type(err).__name__}: {err}",
             traceback=traceback.format_exc()[-2000:], seconds=round(time.time() - t0, 1))
    finally:
        reset_peak(DEVICE)


# ------------------------------------------------------------------------------------- part a
def part_a_attention(smoke: bool) -> None:
    lengths = [37, 300, 5, 682] if not smoke else [5, 17, 3, 9]
    heads, kv_heads, dh = (16, 4, 128) if not smoke else (4, 2, 16)
    n = sum(lengths)
    cu = packed_cu(lengths, DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        status = backend_status(DEVICE, dtype)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q0 = torch.randn(n, heads, dh, device=DEVICE, dtype=dtype, generator=g)
        k0 = torch.randn(n, kv_heads, dh, device=DEVICE, dtype=dtype, generator=g)
        v0 = torch.randn(n, kv_heads, dh, device=DEVICE, dtype=dtype, generator=g)
        dout = torch.randn(n, heads, dh, device=DEVICE, dtype=dtype, generator=g)

        def run(name: str) -> tuple[torch.Tensor, ...]:
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            out = ATTENTION_BACKENDS[name].fn(q, k, v, cu, max(lengths), scale=dh ** -0.5, cache={})
            out.backward(dout)
            return out.detach(), q.grad, k.grad, v.grad

        ref = run("sdpa")
        for name, why in status.items():
            if name == "sdpa":
                continue
            if why is not None:
                emit(part="a", check="attention_vs_sdpa", backend=name, dtype=str(dtype), skipped=why)
                continue
            try:
                got = run(name)
                diffs = {k: float((a.float() - b.float()).abs().max()) for k, a, b in
                         zip(("out", "dq", "dk", "dv"), got, ref)}
                emit(part="a", check="attention_vs_sdpa", backend=name, dtype=str(dtype), tokens=n,
                     docs=len(lengths), heads=f"{heads}/{kv_heads}", max_abs_diff=diffs)
            except Exception as err:  # noqa: BLE001
                emit(part="a", check="attention_vs_sdpa", backend=name, dtype=str(dtype),
                     error=f"{type(err).__name__}: {err}")

    # model level: logits, loss and grads of a small model with each backend vs sdpa
    cfg = FM9GConfig.from_name("tiny", dim_model=512 if not smoke else 64, dim_head=64 if not smoke else 16,
                               num_heads=8 if not smoke else 4, num_kv_heads=2, dim_ff=1024 if not smoke else 128,
                               num_layers=4 if not smoke else 2, vocab_size=4096 if not smoke else 99,
                               dim_model_base=64 if not smoke else 16, attn_impl="sdpa")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = FM9GModel(cfg).to(device=DEVICE, dtype=dtype)
        ids = torch.randint(0, cfg.vocab_size, (1, n), device=DEVICE)
        labels = torch.randint(0, cfg.vocab_size, (1, n), device=DEVICE)

        def model_run(name: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
            model.config.attn_impl = name
            model.zero_grad(set_to_none=True)
            out = model(ids, cu_seqlens=cu, labels=labels, return_logits=True)
            out.loss.backward()
            return out.logits.detach().float(), out.loss.detach().float(), {
                k: p.grad.float() for k, p in model.named_parameters()}

        ref_logits, ref_loss, ref_grads = model_run("sdpa")
        for name, why in backend_status(DEVICE, dtype).items():
            if name == "sdpa" or why is not None:
                continue
            try:
                logits, loss, grads = model_run(name)
                emit(part="a", check="model_vs_sdpa", backend=name, dtype=str(dtype),
                     logits_max_abs_diff=float((logits - ref_logits).abs().max()),
                     loss_abs_diff=float((loss - ref_loss).abs()),
                     grad_max_abs_diff=max(float((grads[k] - ref_grads[k]).abs().max()) for k in grads),
                     grad_max_abs=max(float(ref_grads[k].abs().max()) for k in grads))
            except Exception as err:  # noqa: BLE001
                emit(part="a", check="model_vs_sdpa", backend=name, dtype=str(dtype),
                     error=f"{type(err).__name__}: {err}")
        del model

    # timing at the 7B attention shape (28 heads MHA, dh 128, 4096 tokens in 4 docs), bf16 fwd+bwd
    if DEVICE.type != "cuda":
        return
    lengths = [1024, 512, 2000, 560]
    n = sum(lengths)
    cu = packed_cu(lengths, DEVICE)
    q0 = torch.randn(n, 28, 128, device=DEVICE, dtype=torch.bfloat16)
    k0, v0 = torch.randn_like(q0), torch.randn_like(q0)
    for name, why in backend_status(DEVICE, torch.bfloat16).items():
        if why is not None:
            continue
        try:
            cache: dict[str, Any] = {}
            times = []
            for i in range(6):
                q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
                sync(DEVICE)
                t0 = time.perf_counter()
                ATTENTION_BACKENDS[name].fn(q, k, v, cu, max(lengths), scale=128 ** -0.5, cache=cache).sum().backward()
                sync(DEVICE)
                if i >= 2:  # warm-up (flex compiles)
                    times.append(time.perf_counter() - t0)
            emit(part="a", check="attention_timing", backend=name, dtype="bf16", tokens=n, heads=28, dim_head=128,
                 fwd_bwd_ms=round(1000 * sorted(times)[len(times) // 2], 3))
        except Exception as err:  # noqa: BLE001
            emit(part="a", check="attention_timing", backend=name, error=f"{type(err).__name__}: {err}")


# ------------------------------------------------------------------------------------- part b
def part_b_7b(smoke: bool) -> None:
    if smoke:
        cfg = FM9GConfig.from_name("tiny", num_layers=2, qkv_bias=True, tie_lm_head=False)
        lengths = [10, 20, 7, 27]
    else:
        cfg = FM9GConfig.from_name("fm9g-7b")
        lengths = [1500, 700, 1200, 696]  # 4096 tokens, 4 documents
    n = sum(lengths)
    with torch.device("meta"):
        model = FM9GModel(cfg)
    model.to(torch.bfloat16)  # still on meta: no memory yet
    model.to_empty(device=DEVICE)  # allocate bf16 storage directly (15 GiB for 7B)
    torch.manual_seed(0)
    model.init_weights()
    params = sum(p.numel() for p in model.parameters())
    backend = model.attention_backend(DEVICE, torch.bfloat16)
    emit(part="b", config="fm9g-7b" if not smoke else "tiny", parameters=params, attn_backend=backend,
         params_gib=alloc_gib(DEVICE))
    cu = packed_cu(lengths, DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=DEVICE)
    labels = torch.roll(ids, -1, dims=1)
    labels[0, cu[1:-1].long() - 1] = -100  # no label across document ends
    for ckpt in (True, False):
        model.set_activation_checkpointing(ckpt)
        try:
            times, loss = [], None
            for i in range(4):
                model.zero_grad(set_to_none=True)
                reset_peak(DEVICE) if i == 1 else None
                sync(DEVICE)
                t0 = time.perf_counter()
                out = model(ids, cu_seqlens=cu, labels=labels)
                out.loss.backward()
                sync(DEVICE)
                loss = out.loss.item()
                if i >= 1:
                    times.append(time.perf_counter() - t0)
            step = sorted(times)[len(times) // 2]
            flops = 6 * params * n + 12 * cfg.num_layers * cfg.num_heads * cfg.dim_head * sum(l * l for l in lengths) / 2
            emit(part="b", activation_checkpointing=ckpt, tokens=n, docs=len(lengths), dtype="bf16",
                 loss=round(loss, 4), step_s=round(step, 4), tokens_per_s=round(n / step, 1),
                 model_tflops=round(flops / step / 1e12, 1), peak_gib=peak_gib(DEVICE),
                 finite=math.isfinite(loss))
        except Exception as err:  # noqa: BLE001
            emit(part="b", activation_checkpointing=ckpt, error=f"{type(err).__name__}: {err}")
        finally:
            model.zero_grad(set_to_none=True)
            out = None  # noqa: F841
            reset_peak(DEVICE)
    del model


# ------------------------------------------------------------------------------------- part c
def part_c_loss_memory(smoke: bool) -> None:
    vocab, d, n = (73448, 2048, 32768) if not smoke else (997, 64, 512)
    dtype = torch.bfloat16
    full_fp32_gib = n * vocab * 4 / 2**30
    emit(part="c", tokens=n, vocab=vocab, dim_model=d, full_fp32_logits_gib=round(full_fp32_gib, 2))

    # head only: hidden states and the output matrix are given; measure what the loss adds
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h0 = (torch.randn(n, d, device=DEVICE, generator=g) * 0.5).to(dtype)
    w0 = (torch.randn(vocab, d, device=DEVICE, generator=g) * 0.02).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=DEVICE, generator=g)
    labels[: n // 10] = -100
    results: dict[str, Any] = {}
    for how in ("chunked", "naive"):
        try:
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            reset_peak(DEVICE)
            base = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
            sync(DEVICE)
            t0 = time.perf_counter()
            if how == "chunked":
                tl = chunked_cross_entropy(h, w, labels)
                loss = tl.sum() / (labels != -100).sum()
            else:
                loss = F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100)
            loss.backward()
            sync(DEVICE)
            extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if DEVICE.type == "cuda" else None
            results[how] = (float(loss), h.grad.float(), w.grad.float())
            emit(part="c", check="head_only", method=how, loss=round(float(loss), 6),
                 seconds=round(time.perf_counter() - t0, 3),
                 peak_above_inputs_gib=None if extra is None else round(extra, 3))
            del h, w, loss
        except Exception as err:  # noqa: BLE001
            emit(part="c", check="head_only", method=how, error=f"{type(err).__name__}: {err}")
        reset_peak(DEVICE)
    if "chunked" in results and "naive" in results:
        (l1, gh1, gw1), (l2, gh2, gw2) = results["chunked"], results["naive"]
        emit(part="c", check="head_only_agreement", loss_abs_diff=abs(l1 - l2),
             grad_h_max_abs_diff=float((gh1 - gh2).abs().max()), grad_w_max_abs_diff=float((gw1 - gw2).abs().max()),
             grad_w_max_abs=float(gw2.abs().max()))
    results.clear()
    del h0, w0

    # whole model: d 2048, 2 layers, vocab 73448, one 32k-token row (8 documents)
    cfg = FM9GConfig.from_name("tiny", vocab_size=vocab, dim_model=d, dim_head=128 if not smoke else 16,
                               num_heads=16 if not smoke else 4, num_kv_heads=4 if not smoke else 2,
                               dim_ff=5632 if not smoke else 128, num_layers=2, scale=False, scale_depth=-1.0,
                               tie_lm_head=False, max_length=n)
    torch.manual_seed(0)
    model = FM9GModel(cfg).to(device=DEVICE, dtype=dtype)
    model.set_activation_checkpointing(True)
    cu = packed_cu([n // 8] * 8, DEVICE)
    ids = torch.randint(0, vocab, (1, n), device=DEVICE)
    mlabels = torch.roll(ids, -1, dims=1)
    for how in ("chunked", "naive"):
        try:
            model.zero_grad(set_to_none=True)
            reset_peak(DEVICE)
            sync(DEVICE)
            t0 = time.perf_counter()
            if how == "chunked":
                loss = model(ids, cu_seqlens=cu, labels=mlabels).loss
            else:
                logits = model(ids, cu_seqlens=cu).logits  # (1, n, V) bf16
                loss = F.cross_entropy(logits.float().view(n, vocab), mlabels.view(n), ignore_index=-100)
                del logits
            loss.backward()
            sync(DEVICE)
            emit(part="c", check="model", method=how, loss=round(float(loss), 6),
                 seconds=round(time.perf_counter() - t0, 3), peak_gib=peak_gib(DEVICE),
                 attn_backend=model.attention_backend(DEVICE, dtype))
            del loss
        except Exception as err:  # noqa: BLE001
            emit(part="c", check="model", method=how, error=f"{type(err).__name__}: {err}")
        reset_peak(DEVICE)
    del model


# ---------------------------------------------------------------------------------------- main
DEVICE = torch.device("cpu")


def main() -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU ok): check that every part runs")
    ap.add_argument("--parts", default="a,b,c", help="comma-separated subset of a,b,c")
    args = ap.parse_args()
    DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if DEVICE.type != "cuda" and not args.smoke:
        emit(status="error", error="no CUDA device: run on a GPU, or pass --smoke for a CPU check")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    emit(torch=torch.__version__, device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
         smoke=args.smoke, backends={k: v or "available" for k, v in backend_status(DEVICE, torch.bfloat16).items()})
    parts = {"a": part_a_attention, "b": part_b_7b, "c": part_c_loss_memory}
    for key in args.parts.split(","):
        run_part(key.strip(), lambda fn=parts[key.strip()]: fn(args.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
