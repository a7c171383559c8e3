"""Probe: can cuDNN's ragged (packed-document) attention train, and how fast is it against torch's
flash kernels? W1's layout (16 heads of 128, 4 documents of 1024) and W2's (28 heads).

    python benchmarks/cudnn_probe.py        # on a CUDA machine; prints one JSON line per check

Checks, each against fp32 sdpa per document (relative L2 error of out, dq, dk, dv):
  flash            torch's varlen flash kernels (forward and backward)
  cudnn_autograd   aten._cudnn_attention_forward with cum_seq offsets, backward by aten's autograd
  cudnn_explicit   the same forward, backward by calling aten._cudnn_attention_backward
  hybrid           cuDNN forward, flash backward fed cuDNN's out and logsumexp
Then the forward and forward+backward times of flash and cuDNN (median of CUDA-event timings).
"""
from __future__ import annotations

import json
import statistics

import torch
import torch.nn.functional as F

A = torch.ops.aten


def reference(q, k, v, cu, scale):
    outs = []
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        qd, kd, vd = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale).squeeze(0).transpose(0, 1))
    return torch.cat(outs)


def flash_fwd(q, k, v, cu, mx, scale):
    out, lse, rng, _, _ = A._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, True, False, scale=scale)
    return out, lse, rng


def flash_bwd(do, q, k, v, out, lse, cu, mx, rng, scale):
    unused = torch.empty(0, device=q.device)
    return A._flash_attention_backward(do, q, k, v, out, lse, cu, cu, mx, mx, 0.0, True, rng, unused, scale=scale)


def cudnn_fwd(q, k, v, cu, mx, scale):
    r = A._cudnn_attention_forward(q, k, v, None, cu, cu, mx, mx, True, 0.0, True, False, scale=scale)
    return r[0], r[1], r[6], r[7]


def err(a, r):
    return round(((a.float() - r).norm() / r.norm()).item(), 5)


def check(heads: int, n_docs: int = 4, doc: int = 1024) -> None:
    torch.manual_seed(0)
    n, scale = n_docs * doc, 128 ** -0.5
    cu = torch.arange(0, n + 1, doc, dtype=torch.int32, device="cuda")
    cu_mixed = torch.tensor([0, 700, 701, 1500, 2048, 3000, n], dtype=torch.int32, device="cuda")
    for name_cu, c, mx in (("equal", cu, doc), ("mixed", cu_mixed, int((cu_mixed[1:] - cu_mixed[:-1]).max()))):
        q, k, v = (torch.randn(n, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        do = torch.randn(n, heads, 128, device="cuda", dtype=torch.bfloat16)
        qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
        ref = reference(qf, kf, vf, c, scale)
        ref_g = torch.autograd.grad(ref, (qf, kf, vf), do.float())
        refs = [ref.detach(), *ref_g]
        res: dict[str, object] = {"heads": heads, "docs": name_cu}
        out, lse, rng = flash_fwd(q, k, v, c, mx, scale)
        res["flash_lse_shape"] = list(lse.shape)
        res["flash"] = [err(t, r) for t, r in zip([out, *flash_bwd(do, q, k, v, out, lse, c, mx, rng, scale)], refs)]
        try:
            qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
            o = A._cudnn_attention_forward(qa, ka, va, None, c, c, mx, mx, True, 0.0, True, False, scale=scale)[0]
            g = torch.autograd.grad(o, (qa, ka, va), do)
            res["cudnn_autograd"] = [err(t, r) for t, r in zip([o, *g], refs)]
        except Exception as e:  # noqa: BLE001 - a probe reports every failure
            res["cudnn_autograd"] = f"{type(e).__name__}: {e}"[:300]
        o, stats, seed, off = cudnn_fwd(q, k, v, c, mx, scale)
        res["cudnn_stats_shape"] = list(stats.shape)
        try:
            g = A._cudnn_attention_backward(do, q, k, v, o, stats, seed, off, torch.empty(0, device="cuda"),
                                            c, c, mx, mx, 0.0, True, scale=scale)
            res["cudnn_explicit"] = [err(t, r) for t, r in zip([o, *g], refs)]
        except Exception as e:  # noqa: BLE001
            res["cudnn_explicit"] = f"{type(e).__name__}: {e}"[:300]
        for layout in ("h_total", "as_flash"):
            try:
                if layout == "h_total":
                    l2 = stats.reshape(n, heads).t().contiguous()
                else:
                    l2 = stats.reshape(n, heads).t().reshape(lse.shape).contiguous() if lse.numel() == n * heads else None
                if l2 is None:
                    raise RuntimeError(f"flash lse {list(lse.shape)} is not {n}x{heads}")
                g = flash_bwd(do, q, k, v, o, l2, c, mx, rng, scale)
                res[f"hybrid_{layout}"] = [err(t, r) for t, r in zip([o, *g], refs)]
            except Exception as e:  # noqa: BLE001
                res[f"hybrid_{layout}"] = f"{type(e).__name__}: {e}"[:300]
        res["lse_vs_stats"] = err(stats.reshape(n, heads).t().reshape(lse.shape), lse.float()) if lse.numel() == n * heads else None
        # timings
        def t(fn, reps=30):
            ts = []
            for _ in range(reps + 5):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); fn(); e.record(); torch.cuda.synchronize()
                ts.append(s.elapsed_time(e))
            return round(statistics.median(ts[5:]), 4)
        res["ms_flash_fwd"] = t(lambda: flash_fwd(q, k, v, c, mx, scale))
        res["ms_cudnn_fwd"] = t(lambda: cudnn_fwd(q, k, v, c, mx, scale))
        res["ms_flash_bwd"] = t(lambda: flash_bwd(do, q, k, v, out, lse, c, mx, rng, scale))
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    print(json.dumps({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                      "gpu": torch.cuda.get_device_name()}))
    check(16)
    check(28)
