"""`AdamWBF16`: AdamW holding weights and both moments in bf16 (``optimizer="adamw_bf16"``).

The default optimizer (``"adamw"``) keeps fp32 master weights, fp32 gradients and two fp32
moments: 16 bytes per trained parameter, 123 GB for a 7B full fine-tune before activations. This
one keeps the trained weights, their gradients and both moments in bf16: 8 bytes per parameter
(61 GB for the 7B), which is what lets a 7B full fine-tune fit one 80 GB GPU without moving the
optimizer to the CPU.

The update itself is computed in fp32 registers exactly as ``torch.optim.AdamW`` computes it
(decoupled weight decay, bias-corrected moments); only the stores are bf16:

* moments are rounded to the nearest bf16 value (with the FM9G betas, 0.9 / 0.95, a step changes
  them by 5-10 %, far above bf16's 0.4 % resolution);
* weights are rounded **stochastically**: the fp32 result goes up or down to one of its two bf16
  neighbours with probabilities that make the stored weight unbiased. With round-to-nearest an
  update smaller than half a bf16 step (lr x update < weight / 512) would vanish every time, and
  a long run at a small learning rate would stop learning; with stochastic rounding it lands on
  average.

The rounding noise is a hash of the element's position and ``(seed, call, parameter index,
chunk)``: a resumed run draws the same noise as the straight one, so resume stays exact without
saving an RNG state (the call counter travels in the param groups of the state dict), and on CUDA
the whole update of a chunk, noise included, compiles into one kernel (``torch.compile``; it reads
each bf16 weight, gradient and moment once and writes them once, 14 bytes per parameter).

Like the fused ``torch.optim.AdamW`` it reads ``grad_scale`` (each gradient is divided by it: the
clip coefficient) and ``found_inf`` (when > 0 nothing changes, step counts included) as device
tensors, so the step never waits for the GPU. Large tensors are updated in chunks
(``chunk_elements``), which bounds the fp32 temporaries to a few times that size.

Parameters stored in fp32 (the CPU, where bf16 matmuls are slow) are updated with the same
numerics: their values stay exactly representable in bf16, their moments are bf16; only the
memory saving is lost.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["AdamWBF16", "round_stochastic"]

_LOW16 = -65536  # 0xFFFF0000 as int32: keeps sign, exponent and the 7 mantissa bits bf16 holds
_MASK32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # an odd 27-bit multiplier of a well-mixing 32-bit integer hash
_SEED_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _noise_key(seed: int, call: int, index: int, chunk: int) -> int:
    """A 32-bit key from the four counters (splitmix64-style mixing: nearby inputs, unrelated keys)."""
    h = (seed * _SEED_MIX[0] + call * _SEED_MIX[1] + index * _SEED_MIX[2] + chunk) & (2**64 - 1)
    h ^= h >> 31
    h = (h * _SEED_MIX[1]) & (2**64 - 1)
    h ^= h >> 29
    return h & _MASK32


def _noise16(n: int, key: torch.Tensor) -> torch.Tensor:
    """16 pseudo-random bits per position 0..n-1 (int32), a function of the position and ``key``
    (a 0-d int64 tensor). Every product stays below 2**63: no overflow on any device."""
    x = (torch.arange(n, device=key.device, dtype=torch.int64) * 0x9E3779B1 + key) & _MASK32
    for _ in range(2):
        x = (((x >> 16) ^ x) * _HASH_MUL) & _MASK32
    x = (x >> 16) ^ x
    return (x & 0xFFFF).to(torch.int32)


def round_stochastic(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16, up or down with probabilities proportional to the distance
    (``E[round(x)] = x``); ``key`` (a 0-d int64 tensor) selects the noise. Non-finite values are
    rounded to nearest (the noise could carry a NaN's mantissa into its sign)."""
    bits = x.reshape(-1).view(torch.int32)
    rounded = ((bits + _noise16(bits.numel(), key)) & _LOW16).view(torch.float32).reshape(x.shape)
    return torch.where(torch.isfinite(x), rounded.to(torch.bfloat16), x.to(torch.bfloat16))  # exact: low bits 0


def _update_chunk(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                  bc1: torch.Tensor, bc2_sqrt: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor,
                  key: torch.Tensor, beta1: float, beta2: float, eps: float, wd: float) -> None:
    """One chunk's AdamW update, in place: computed in fp32 (as ``torch.optim.AdamW``), stored as
    bf16 values (weights rounded stochastically, moments to nearest); nothing changes where
    ``keep`` is False. Every argument that changes from step to step is a tensor, so the compiled
    kernel is reused."""
    g32 = g.float() / scale
    m32 = torch.lerp(m.float(), g32, 1 - beta1)
    v32 = v.float() * beta2 + g32 * g32 * (1 - beta2)
    denom = v32.sqrt() / bc2_sqrt + eps
    w32 = w.float() * (1 - lr * wd) - (lr / bc1) * (m32 / denom)
    w_new = torch.where(keep, round_stochastic(w32, key), w.to(torch.bfloat16))
    m_new = torch.where(keep, m32.to(torch.bfloat16), m.to(torch.bfloat16))
    v_new = torch.where(keep, v32.to(torch.bfloat16), v.to(torch.bfloat16))
    w.copy_(w_new)
    m.copy_(m_new)
    v.copy_(v_new)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for it (pinned, non-blocking on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class AdamWBF16(torch.optim.Optimizer):
    """AdamW with bf16 weights, bf16 moments and stochastically rounded updates.

    Args:
        params: parameters or parameter groups (as any torch optimizer; groups may set ``lr``,
            ``betas``, ``eps``, ``weight_decay`` and carry extra keys such as ``lr_scale``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay decoupled).
        seed: seeds the rounding noise (the run's seed makes a run reproducible).
        chunk_elements: tensors larger than this are updated in pieces of this many elements.
        compile: ``torch.compile`` the update of a chunk into one kernel: ``"auto"`` on CUDA only
            (on CPU the eager update is used; the results agree to fp32 rounding).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, seed: int = 0,
                 chunk_elements: int = 1 << 24, compile: bool | str = "auto") -> None:
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"AdamWBF16: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamWBF16: betas must lie in [0, 1), got {tuple(betas)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            group.setdefault("rounding_calls", 0)
        self.seed = int(seed)
        self.chunk_elements = int(chunk_elements)
        self.compile = compile
        self._compiled: Any = None
        self.grad_scale: torch.Tensor | None = None  # set per step by the engine (clip coefficient)
        self.found_inf: torch.Tensor | None = None  # set per step by the engine (> 0: skip the step)

    def _kernel(self, device: torch.device) -> Any:
        use = self.compile if self.compile != "auto" else device.type == "cuda"
        if not use:
            return _update_chunk
        if self._compiled is None:
            self._compiled = torch.compile(_update_chunk, dynamic=True, fullgraph=True)
        return self._compiled

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (parameter, its group's position, noise keys of its chunks)
        keys: list[int] = []
        index = 0
        for g_idx, group in enumerate(self.param_groups):
            call = group["rounding_calls"]
            group["rounding_calls"] = call + 1
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBF16 does not support sparse gradients")
                n_chunks = -(-p.numel() // self.chunk_elements) if self._flat(p) else 1
                work.append((p, g_idx, len(keys), n_chunks))
                keys += [_noise_key(self.seed, call, index, c) for c in range(n_chunks)]
        if not work:
            return loss
        # the step's keys and learning rates reach the device in one non-blocking copy each: no host sync
        dev = work[0][0].device
        keys_dev = _to_device(torch.tensor(keys, dtype=torch.int64), dev)
        lrs_dev = _to_device(torch.tensor([float(g["lr"]) for g in self.param_groups]), dev)
        for p, g_idx, first, n_chunks in work:
            self._update_one(p, self.param_groups[g_idx], lrs_dev[g_idx], keys_dev[first:first + n_chunks])
        return loss

    @staticmethod
    def _flat(p: torch.Tensor) -> bool:
        return p.is_contiguous() and p.grad.is_contiguous()

    def _update_one(self, p: torch.Tensor, group: dict[str, Any], lr: torch.Tensor, keys: torch.Tensor) -> None:
        state = self._init_state(p)
        beta1, beta2 = group["betas"]
        dev = p.device
        if self.found_inf is None:
            keep = torch.ones((), dtype=torch.bool, device=dev)
        else:
            keep = self.found_inf.to(dev) <= 0
        step = state["step"]
        step.add_(keep.float())
        bc1 = 1 - torch.pow(beta1, step)
        bc2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
        scale = torch.ones((), device=dev) if self.grad_scale is None else self.grad_scale.to(dev).float()
        tensors = (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])
        if self._flat(p):  # the moments are always contiguous
            flat = [t.view(-1) for t in tensors]
            n, size = flat[0].numel(), self.chunk_elements
            chunks = [[t[start:start + size] for t in flat] for start in range(0, n, size)]
        else:  # a strided parameter or gradient: in one piece
            chunks = [list(tensors)]
        kernel = self._kernel(dev)
        for c, (w, g, m, v) in enumerate(chunks):
            kernel(w, g, m, v, lr, bc1, bc2_sqrt, scale, keep, keys[c], beta1, beta2,
                   group["eps"], group["weight_decay"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state (also one saved by ``torch.optim.AdamW``: its fp32 moments become bf16)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("rounding_calls", 0)
        for p, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(device=p.device, dtype=torch.bfloat16).contiguous()
            if "step" in state:
                # a copy: an in-memory state_dict shares its tensors with the optimizer it came from
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=p.device).reshape(()).clone()
