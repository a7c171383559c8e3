"""Host (Python) time of the per-step bookkeeping around a W1-layout model, on CPU.

    python benchmarks/host_overhead.py

W1 on an H200 is host-bound with `optimizer="adamw_master"` (the GPU is busy 74 ms of a 79-81 ms
step, benchmarks/RESULTS.md, 2026-12-04): every millisecond of Python per step is a millisecond of
step time. This times, in microseconds per call, the pieces that walk every module or parameter of
the model, with the W1 layout (24 layers, 291 parameters, 366 modules) at tiny widths so that no
arithmetic hides them:

    model_train            model.train() (walks all 366 modules)
    flat_grads_nothing     AdamWMaster.flat_grads() when every gradient is already in the buffer
    drop_and_copy          zero_grad() + new gradients + flat_grads() (the one-backward step's path),
                           less the time to make the gradients
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_call_us(fn, reps: int = 300) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def main() -> None:
    import torch

    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.training.optimizers import AdamWMaster

    torch.set_num_threads(1)
    cfg = FM9GConfig(vocab_size=512, dim_model=32, num_layers=24, num_heads=2, num_kv_heads=2, dim_head=16,
                     dim_ff=64, tie_lm_head=False, qkv_bias=True)
    model = FM9GModel(cfg)
    params = list(model.parameters())
    opt = AdamWMaster(params, lr=1e-3, compile=False)

    def new_grads():
        for p in params:
            p.grad = torch.zeros_like(p)

    def drop_and_copy():
        opt.zero_grad()
        new_grads()
        opt.flat_grads()

    new_grads()
    opt.flat_grads()
    out = {
        "modules": sum(1 for _ in model.modules()),
        "parameters": len(params),
        "model_train_us": round(per_call_us(model.train), 1),
        "flat_grads_nothing_us": round(per_call_us(opt.flat_grads), 1),
        "drop_and_copy_us": round(per_call_us(drop_and_copy) - per_call_us(new_grads), 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
