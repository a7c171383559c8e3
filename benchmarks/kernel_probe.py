"""Upper bounds for kernel changes, before they go into the model: time one layer's projection
GEMMs forward + backward, separate (as the model computes them) against fused into one GEMM.

    python benchmarks/kernel_probe.py            # W1 (1.5B, full FT) and W2 (7B shape, frozen base + LoRA r64)

Prints one JSON line per case (ms per call, median of 20 after 5 warm-ups, CUDA events). This is a
probe, not a user path: the figures that count come from ``benchmarks/run.py``.
"""
from __future__ import annotations

import json
import statistics

import torch
import torch.nn.functional as F

SHAPES = {"W1": dict(d=2048, ff=5504, tokens=4096, train_base=True),
          "W2": dict(d=3584, ff=18944, tokens=4096, train_base=False)}


def _time(fn, n: int = 20, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def probe(name: str, d: int, ff: int, tokens: int, train_base: bool, r: int = 64) -> list[dict]:
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(tokens, d, device=dev, dtype=bf, requires_grad=True)
    outs = {"qkv": [d, d, d], "gate_up": [ff, ff]}
    rows = []
    for group, widths in outs.items():
        ws = [(torch.randn(w, d, device=dev, dtype=bf) * 0.02).requires_grad_(train_base) for w in widths]
        As = [(torch.randn(r, d, device=dev) * 0.02).requires_grad_(True) for _ in widths]
        Bs = [(torch.randn(w, r, device=dev) * 0.02).requires_grad_(True) for w in widths]
        lora = not train_base
        gy = [torch.randn(tokens, w, device=dev, dtype=bf) for w in widths]

        def separate():
            ys = []
            for w, A, B in zip(ws, As, Bs):
                y = F.linear(x, w)
                if lora:
                    y = y + F.linear(F.linear(x, A.to(bf)), B.to(bf)) * 0.5
                ys.append(y)
            torch.autograd.backward(ys, gy)

        w_fused = torch.cat(ws).detach().requires_grad_(train_base)

        def fused(weight=None):  # weight None: cat the layers' weights per call; else one tensor already
            y = F.linear(x, torch.cat(ws) if weight is None else weight)
            if lora:
                t = F.linear(x, torch.cat([A.to(bf) for A in As]))
                parts = y.split(widths, dim=1)
                ys = [p + F.linear(t[:, i * r:(i + 1) * r], B.to(bf)) * 0.5 for i, (p, B) in enumerate(zip(parts, Bs))]
            else:
                ys = list(y.split(widths, dim=1))
            torch.autograd.backward(ys, gy)

        def fused_prebuilt():  # the weights already one tensor (frozen base as views of one buffer)
            fused(w_fused)

        flops = 2 * tokens * d * sum(widths) * (3 if train_base else 2)
        for label, fn in (("separate", separate), ("fused_cat", fused), ("fused_prebuilt", fused_prebuilt)):
            ms = _time(fn)
            rows.append(dict(workload=name, group=group, variant=label, lora=lora, ms=round(ms, 3),
                             base_tflops=round(flops / ms / 1e9, 1)))
            print(json.dumps(rows[-1]), flush=True)
            x.grad = None
            for t in (*ws, *As, *Bs, w_fused):
                t.grad = None
    return rows


def main() -> None:
    for name, s in SHAPES.items():
        probe(name, **s)


if __name__ == "__main__":
    main()
