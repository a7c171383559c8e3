"""Time ``offload: true``'s optimizer step (:class:`~fm9g.training.offload_optimizer.AdamWOffload`)
on this machine, and its parts: the gradients' copy to the host, the CPU's fused AdamW, the
weights' copy back. W3's step spends its non-GEMM seconds here (7.67 B trained parameters).

    python benchmarks/offload_step.py --elements 1e9 --threads 16,8 --chunks 26,24

Prints one JSON line per configuration (seconds per step, and per 1e9 parameters).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def _time(fn, n: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    from fm9g.training.offload_optimizer import AdamWOffload

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=float, default=1e9, help="trained parameters (one flat bf16 tensor)")
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="CPU threads to try, comma-separated")
    ap.add_argument("--chunks", default="24,26", help="log2 of the streamed chunk's elements, comma-separated")
    args = ap.parse_args()
    n = int(args.elements)
    p = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.02)
    p.grad = torch.randn_like(p) * 1e-3
    host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    d2h = _time(lambda: host.copy_(p.grad, non_blocking=True))
    h2d = _time(lambda: p.data.copy_(host, non_blocking=True))
    print(json.dumps({"part": "copies", "elements": n, "d2h_s": round(d2h, 4), "h2d_s": round(h2d, 4),
                      "d2h_GBps": round(2 * n / d2h / 1e9, 1)}), flush=True)
    for k in (int(c) for c in args.chunks.split(",")):
        opt = AdamWOffload([p], lr=1e-5, chunk_elements=1 << k)
        opt.step()  # builds the state
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            bucket = opt._buckets[0][0]
            g32 = torch.randn(1 << k) * 1e-3

            def cpu_adam() -> None:
                for a in range(0, n, 1 << k):
                    b = min(a + (1 << k), n)
                    torch._fused_adamw_([bucket.master[a:b]], [g32[:b - a]], [bucket.exp_avg[a:b]],
                                        [bucket.exp_avg_sq[a:b]], [], [bucket.step], lr=1e-5, beta1=0.9,
                                        beta2=0.95, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
            adam = _time(cpu_adam, 2)
            step = _time(opt.step, 2)
            print(json.dumps({"part": "step", "elements": n, "chunk_log2": k, "threads": threads,
                              "step_s": round(step, 3), "cpu_adamw_s": round(adam, 3),
                              "step_s_per_1e9": round(step / n * 1e9, 3)}), flush=True)
        del opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
