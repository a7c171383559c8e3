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

The rounding noise is a hash of the element's position and ``(seed, call, bucket, chunk)``: a
resumed run draws the same noise as the straight one, so resume stays exact without saving an RNG
state (the call counter travels in the param groups of the state dict), and on CUDA
the whole update of a chunk, noise included, compiles into one kernel (``torch.compile``; it reads
each bf16 weight, gradient and moment once and writes them once, 14 bytes per parameter).

Like the fused ``torch.optim.AdamW`` it reads ``grad_scale`` (each gradient is divided by it: the
clip coefficient) and ``found_inf`` (when > 0 nothing changes, step counts included) as device
tensors, so the step never waits for the GPU. The parameters of a group live in one flat buffer
(a "bucket" per device and dtype), updated in chunks of ``chunk_elements``: a 1.5B model's step is
six kernels, not one or more per tensor (the per-tensor version spent 84 ms of a 184 ms W1 step
launching small kernels on an H200).

Parameters stored in fp32 (the CPU, where bf16 matmuls are slow) are updated with the same
numerics: their values stay exactly representable in bf16, their moments are bf16; only the
memory saving is lost.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch

from fm9g.training.parallelize import is_sharded, local_view, stays_whole

__all__ = ["AdamWBF16", "AdamWMaster", "round_stochastic"]

_LOW16 = -65536  # 0xFFFF0000 as int32: keeps sign, exponent and the 7 mantissa bits bf16 holds
_MASK32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # an odd 27-bit multiplier of a well-mixing 32-bit integer hash
# The golden-ratio multiplier 0x9E3779B1 less 2**32: the same product modulo 2**32, but a literal
# that fits int32 (Triton types a literal by the tensor it meets: 0x9E3779B1 against the int32
# position index fails to compile on CUDA).
_GOLDEN = 0x9E3779B1 - 2**32
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
    x = (torch.arange(n, device=key.device, dtype=torch.int64) * _GOLDEN + key) & _MASK32
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
                  step: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor, key: torch.Tensor,
                  beta1: float, beta2: float, eps: float, wd: float) -> None:
    """One chunk's AdamW update, in place: computed in fp32 (as ``torch.optim.AdamW``), stored as
    bf16 values (weights rounded stochastically, moments to nearest); nothing changes where
    ``keep`` is False. ``step`` is the step count after this step. Every argument that changes
    from step to step is a tensor, so the compiled kernel is reused."""
    bc1 = 1 - torch.pow(beta1, step)
    bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
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


def _update_chunk_master(w: torch.Tensor, g: torch.Tensor, master: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                         lr: torch.Tensor, step: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor,
                         beta1: float, beta2: float, eps: float, wd: float) -> None:
    """One chunk of ``torch.optim.AdamW`` on fp32 master weights and moments, in place, reading the
    (bf16) gradient of the compute weights ``w`` and writing ``w`` as the master rounded to nearest."""
    bc1 = 1 - torch.pow(beta1, step)
    bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
    g32 = g.float() / scale
    m32 = torch.lerp(m, g32, 1 - beta1)
    v32 = v * beta2 + g32 * g32 * (1 - beta2)
    w32 = master * (1 - lr * wd) - (lr / bc1) * (m32 / (v32.sqrt() / bc2_sqrt + eps))
    w32 = torch.where(keep, w32, master)
    m.copy_(torch.where(keep, m32, m))
    v.copy_(torch.where(keep, v32, v))
    master.copy_(w32)
    w.copy_(w32.to(w.dtype))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for it (pinned, non-blocking on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _FlatBucket:
    """The parameters of one group that share a device and dtype, stored in one flat buffer.

    Each parameter's ``.data`` and ``.grad`` are views into ``weights`` / ``grads``, and its
    moments views into ``exp_avg`` / ``exp_avg_sq`` (bf16; fp32 with ``master``, which adds the
    fp32 ``master`` weights): the update runs over the whole bucket
    in a few large kernels instead of several small ones per parameter.

    Gradients reach the buffer in one of two ways. Zeroed in place (``zero_grad(set_to_none=False)``),
    the views stay ``.grad`` and backward adds onto them: nothing extra is ever allocated (the way
    for several micro-batches). Dropped (``zero_grad()``, ``.grad`` = None), autograd hands each
    parameter a gradient tensor of its own and :meth:`sync` copies them all into the buffer in one
    multi-tensor copy before the norm and the update: one copy per gradient where zero-then-add
    costs a fill and an add, for one extra set of gradients alive at the end of backward.
    """

    def __init__(self, params: list[torch.Tensor], *, compute_dtype: torch.dtype | None = None,
                 moment_dtype: torch.dtype = torch.bfloat16, master: bool = False, external: bool = False,
                 state_device: torch.device | None = None,
                 initial_masters: dict[torch.Tensor, torch.Tensor] | None = None) -> None:
        first = local_view(params[0])
        self.params = params
        # external: the parameters are FSDP2's shards (it owns their storage); a parameter every rank
        # keeps whole (parallelize.replicated_params) is the buffer's view, as in one process
        self.external = external and is_sharded(params[0])
        self.shapes = [local_view(p).shape for p in params]
        self.numels = [local_view(p).numel() for p in params]
        self.offsets = [0, *itertools.accumulate(self.numels)][:-1]
        total = sum(self.numels)
        kw = dict(device=first.device)
        dtype = compute_dtype or first.dtype
        self.weights = torch.empty(total, dtype=dtype, **kw)
        self.grads = torch.zeros(total, dtype=dtype, **kw)
        state = dict(device=state_device or first.device)  # the masters and moments (the CPU with offload)
        self.step = torch.zeros((), dtype=torch.float32, **state)
        # made by sync() (the views and addresses it checks every step), keyed by the buffers' addresses
        self._layout_key: tuple[int, ...] | None = None
        self._grad_views: list[torch.Tensor] = []
        self._weight_ptrs: list[int] = []
        self._grad_ptrs: list[int] = []
        # fp32 master weights (AdamWMaster): a separate buffer unless the compute weights are fp32
        self.master: torch.Tensor | None = None
        if master:
            same = dtype == torch.float32 and state["device"] == first.device
            self.master = self.weights if same else torch.empty(total, dtype=torch.float32, **state)
        for i in range(len(params)):  # one at a time: a parameter's old storage is freed as the next is copied
            self._adopt_weight(i, initial_masters)
        self._fresh = False  # external: the buffer holds the parameters' current gradients (see sync)
        self.sync()  # the gradients: views into the buffer, holding any gradient a parameter had
        self._fresh = False
        # the moments last, once the parameters' old storage is gone (a lower peak while building)
        self.exp_avg = torch.zeros(total, dtype=moment_dtype, **state)
        self.exp_avg_sq = torch.zeros(total, dtype=moment_dtype, **state)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offsets[i]:self.offsets[i] + self.numels[i]].view(self.shapes[i])

    def _adopt_weight(self, i: int, initial_masters: dict[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Make parameter ``i``'s weights (and master) the buffer's. A master in ``initial_masters``
        (its fp32 value, the parameter itself already rounded) is taken from there and dropped from
        the mapping, so that the caller's copy is freed as the buffer fills."""
        p = local_view(self.params[i])
        v = self.view(self.weights, i)
        src = initial_masters.pop(self.params[i], None) if initial_masters else None
        if self.master is not None and self.master is not self.weights:
            self.view(self.master, i).copy_((p.data if src is None else src).reshape(v.shape))  # before rounding: exact
        v.copy_(p.data.reshape(v.shape))
        if not self.external:
            p.data = v

    def weight_views(self) -> list[torch.Tensor]:
        """Each parameter's view into ``weights`` (made once per buffer)."""
        if getattr(self, "_views_of", None) is not self.weights:
            self._views_of = self.weights
            self._weight_views = [self.view(self.weights, i) for i in range(len(self.params))]
        return self._weight_views

    def write_back(self) -> None:
        """External buckets: copy the updated weights into the parameters' own storage (each
        rank's FSDP2 shard) in one multi-tensor copy; a shard that already lives in its view of
        the buffer (:func:`~fm9g.training.parallelize.share_shard_storage`) needs none."""
        dst, src = [], []
        for p, v in zip(self.params, self.weight_views()):
            local = local_view(p)
            if local.data_ptr() != v.data_ptr():
                dst.append(local)
                src.append(v)
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)

    def release_grads(self) -> None:
        """Drop the gradients (``.grad`` = None); :meth:`sync` copies the next ones into the buffer."""
        for p in self.params:
            p.grad = None
        self._fresh = False

    def sync(self) -> None:
        """Re-attach what was replaced since the last step (host-side checks, no kernel unless
        something changed): a ``p.data = ...`` assignment is copied into the weights; gradients
        that are tensors of their own (dropped by ``zero_grad``, or assigned) are copied into the
        buffer in one multi-tensor copy, and a gradient that is None counts as zero.

        Runs every step over every parameter, so the views and their addresses are made once
        (again only if a buffer is replaced). External buckets copy each parameter's (local)
        gradient into the buffer and leave the parameters as they are."""
        if self.external:
            if not self._fresh:  # once per step: the norm and the update both call sync()
                self._copy_external_grads()
                self._fresh = True
            return
        key = (self.weights.data_ptr(), self.grads.data_ptr())
        if self._layout_key != key:
            self._layout_key = key
            self._grad_views = [self.view(self.grads, i) for i in range(len(self.params))]
            wsize = self.weights.element_size()
            self._weight_ptrs = [key[0] + off * wsize for off in self.offsets]
            self._grad_ptrs = [key[1] + off * wsize for off in self.offsets]
        dtype = self.weights.dtype
        copy_to, copy_from, zero = [], [], []
        for i, (p, wptr, gptr, v) in enumerate(zip(self.params, self._weight_ptrs, self._grad_ptrs,
                                                   self._grad_views)):
            if p.data_ptr() != wptr or p.dtype != dtype:
                self._adopt_weight(i)
            g = p.grad
            if g is not None and g.data_ptr() == gptr:
                continue
            if g is None:
                zero.append(v)
            else:
                copy_to.append(v)
                copy_from.append(g if g.shape == v.shape else g.reshape(v.shape))
            p.grad = v
        with torch.no_grad():
            if copy_to:
                torch._foreach_copy_(copy_to, copy_from)
            if zero:
                torch._foreach_zero_(zero)


    def _copy_external_grads(self) -> None:
        if self._layout_key != (self.grads.data_ptr(),):
            self._layout_key = (self.grads.data_ptr(),)
            self._grad_views = [self.view(self.grads, i) for i in range(len(self.params))]
        copy_to, copy_from, zero = [], [], []
        for p, v in zip(self.params, self._grad_views):
            g = p.grad
            if g is None:
                zero.append(v)
            else:
                copy_to.append(v)
                copy_from.append(local_view(g).reshape(v.shape))
        with torch.no_grad():
            if copy_to:
                torch._foreach_copy_(copy_to, copy_from)
            if zero:
                torch._foreach_zero_(zero)


class AdamWBF16(torch.optim.Optimizer):
    """AdamW with bf16 weights, bf16 moments and stochastically rounded updates.

    The parameters of each group are moved into one flat buffer per device and dtype when the
    optimizer is built (their ``.data`` and ``.grad`` become views into it), so a step is a few
    large kernels whatever the number of tensors. Consequences: ``zero_grad()`` drops the gradients
    (backward's new ones are copied into the buffer at the step, one multi-tensor copy) and
    ``zero_grad(set_to_none=False)`` zeroes the buffer for backward to add onto (no second set of
    gradients in memory: the choice for several micro-batches); a parameter whose gradient is None
    at a step is updated with a zero gradient (its moments decay, weight decay applies) where
    ``torch.optim.AdamW`` would skip it.

    Args:
        params: parameters or parameter groups (as any torch optimizer; groups may set ``lr``,
            ``betas``, ``eps``, ``weight_decay`` and carry extra keys such as ``lr_scale``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay decoupled).
        seed: seeds the rounding noise (the run's seed makes a run reproducible).
        chunk_elements: a flat buffer is updated in pieces of this many elements (default: 2**28
            when compiled, which one kernel indexes in int32; 2**24 eager, which bounds the fp32
            temporaries).
        compile: ``torch.compile`` the update of a chunk into one kernel: ``"auto"`` on CUDA only
            (on CPU the eager update is used; the results agree to fp32 rounding).
        external: the parameters keep their own storage (FSDP2 shards, whose DTensor parameters
            cannot become views of a flat buffer): the buffers hold copies, each step copies the
            (local) gradients in and the updated weights back (:meth:`_FlatBucket.write_back`).
    """

    # The engine keeps this optimizer's gradients in the buffer between steps (zeroed in place)
    # even after a one-backward step: it exists to fit a model in memory, and dropping them would
    # hold a second set of gradients at the end of backward. AdamWMaster, the fast one, drops them.
    memory_first = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, seed: int = 0,
                 chunk_elements: int | None = None, compile: bool | str = "auto", external: bool = False) -> None:
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"AdamWBF16: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamWBF16: betas must lie in [0, 1), got {tuple(betas)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = int(seed)
        self.compile = compile
        self.external = external
        self._chunk = chunk_elements
        self._compiled: Any = None
        self.grad_scale: torch.Tensor | None = None  # set per step by the engine (clip coefficient)
        self.found_inf: torch.Tensor | None = None  # set per step by the engine (> 0: skip the step)
        self._buckets: list[list[_FlatBucket]] = []
        for group in self.param_groups:
            group.setdefault("rounding_calls", 0)
            # the parameters FSDP2 keeps whole on every rank (parallelize.stays_whole) in buckets of
            # their own, in one process too: the same layout, so FSDP2 over one rank computes what
            # one process does
            by_kind: dict[tuple[torch.device, torch.dtype, bool], list[torch.Tensor]] = {}
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"AdamWBF16 trains floating-point parameters only, got {p.dtype}")
                by_kind.setdefault((p.device, p.dtype, stays_whole(p)), []).append(p)
            self._buckets.append([self._bucket(ps) for ps in by_kind.values()])

    def _bucket(self, params: list[torch.Tensor]) -> _FlatBucket:
        return _FlatBucket(params, external=self.external)

    def _use_compile(self, device: torch.device) -> bool:
        return bool(self.compile if self.compile != "auto" else device.type == "cuda")

    _update = staticmethod(_update_chunk)  # the eager update of one chunk

    def _kernel(self, device: torch.device) -> Any:
        if not self._use_compile(device):
            return self._update
        if self._compiled is None:
            self._compiled = torch.compile(self._update, dynamic=True, fullgraph=True)
        return self._compiled

    def _chunk_elements(self, device: torch.device) -> int:
        if self._chunk is not None:
            return int(self._chunk)
        return 1 << 28 if self._use_compile(device) else 1 << 24

    def _state_views(self, bucket: _FlatBucket) -> None:
        """Each parameter's state entry: the bucket's step count and views of its moments."""
        for i, p in enumerate(bucket.params):
            self.state[p] = {"step": bucket.step, "exp_avg": bucket.view(bucket.exp_avg, i),
                             "exp_avg_sq": bucket.view(bucket.exp_avg_sq, i)}

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none``, the default: backward's next ones are copied into the
        flat buffers at the step) or zero the buffers in place, the gradients staying views into them."""
        for buckets in self._buckets:
            for b in buckets:
                if set_to_none:
                    b.release_grads()
                    continue
                b.sync()  # first: a gradient assigned since the last step is re-attached, then zeroed
                b.grads.zero_()
                b._fresh = False

    def flat_grads_sharded(self) -> list[bool]:
        """For each buffer of :meth:`flat_grads`, whether it holds FSDP2 shards (False: parameters
        every rank keeps whole, or one process)."""
        return [b.external for buckets in self._buckets for b in buckets]

    def shard_storage(self) -> dict[torch.Tensor, torch.Tensor]:
        """External buckets: ``{parameter: its view of the flat weights}``, where
        :func:`~fm9g.training.parallelize.share_shard_storage` lets FSDP2 keep the shards."""
        return {p: v for buckets in self._buckets for b in buckets if b.external
                for p, v in zip(b.params, b.weight_views())}

    @torch.no_grad()
    def reload_weights(self) -> None:
        """External buckets: take the parameters' current values into the flat weights (after the
        parameters were loaded from a checkpoint; the masters of ``AdamWMaster`` are left as they are)."""
        for buckets in self._buckets:
            for b in buckets:
                for p, v in zip(b.params, b.weight_views()):
                    if local_view(p).data_ptr() != v.data_ptr():
                        v.copy_(local_view(p).reshape(v.shape))

    @torch.no_grad()
    def flat_grads(self) -> list[torch.Tensor]:
        """The gradient buffers, one per bucket, every parameter's gradient in place (a gradient
        backward did not reach is zeroed first): what the gradient norm reads in one kernel each."""
        out = []
        for buckets in self._buckets:
            for b in buckets:
                b.sync()
                out.append(b.grads)
        return out

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (bucket, its group's position, first key, chunk size)
        keys: list[int] = []
        index = 0
        for g_idx, group in enumerate(self.param_groups):
            call = group["rounding_calls"]
            group["rounding_calls"] = call + 1
            for bucket in self._buckets[g_idx]:
                index += 1
                bucket.sync()
                if bucket.params[0] not in self.state:
                    self._state_views(bucket)
                size = self._chunk_elements(bucket.weights.device)
                n_chunks = -(-bucket.weights.numel() // size)
                work.append((bucket, g_idx, len(keys), size))
                keys += [_noise_key(self.seed, call, index, c) for c in range(n_chunks)]
        if not work:
            return loss
        # the step's keys and learning rates reach the device in one non-blocking copy each: no host sync
        dev = work[0][0].weights.device
        keys_dev = _to_device(torch.tensor(keys, dtype=torch.int64), dev)
        lrs = [g["lr"] for g in self.param_groups]
        if any(isinstance(x, torch.Tensor) for x in lrs):  # a learning rate already on the device (launch ahead)
            lrs_dev = torch.stack([x.to(dev, torch.float32) if isinstance(x, torch.Tensor)
                                   else _to_device(torch.tensor(float(x)), dev) for x in lrs])
        else:
            lrs_dev = _to_device(torch.tensor([float(x) for x in lrs]), dev)
        keep = torch.ones((), dtype=torch.bool, device=dev) if self.found_inf is None else self.found_inf.to(dev) <= 0
        scale = torch.ones((), device=dev) if self.grad_scale is None else self.grad_scale.to(dev).float()
        kernel = self._kernel(dev)
        for bucket, g_idx, first, size in work:
            group = self.param_groups[g_idx]
            beta1, beta2 = group["betas"]
            bucket.step.add_(keep.float())
            for c, start in enumerate(range(0, bucket.weights.numel(), size)):
                self._run(kernel, bucket, slice(start, start + size), lrs_dev[g_idx], scale, keep,
                          keys_dev[first + c], beta1, beta2, group["eps"], group["weight_decay"])
            if bucket.external:
                bucket.write_back()
        return loss

    @staticmethod
    def _run(kernel: Any, bucket: _FlatBucket, part: slice, lr: torch.Tensor, scale: torch.Tensor,
             keep: torch.Tensor, key: torch.Tensor, *hyper: float) -> None:
        w, g, m, v = (t[part] for t in (bucket.weights, bucket.grads, bucket.exp_avg, bucket.exp_avg_sq))
        kernel(w, g, m, v, lr, bucket.step, scale, keep, key, *hyper)

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, each parameter with a step count of its own (a
        copy of its bucket's: one shared tensor would be counted once per parameter by the
        multi-tensor AdamW that may load it)."""
        sd = super().state_dict()
        sd["state"] = {k: {**v, "step": v["step"].clone()} if "step" in v else dict(v) for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this optimizer or by ``torch.optim.AdamW`` (its fp32 moments
        become bf16), copying it into the flat buffers (nothing is allocated on the device)."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            raise ValueError(
                "AdamWBF16.load_state_dict: the state holds groups of "
                f"{[len(g['params']) for g in saved_groups]} parameters, this optimizer "
                f"{[len(g['params']) for g in self.param_groups]}")
        saved_state = state_dict.get("state", {})
        with torch.no_grad():
            for g_idx, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
                for k, v in saved.items():
                    if k != "params":
                        mine[k] = tuple(v) if k == "betas" else v
                mine.setdefault("rounding_calls", 0)
                by_param = dict(zip(mine["params"], saved["params"]))
                for bucket in self._buckets[g_idx]:
                    steps = []
                    for i, p in enumerate(bucket.params):
                        st = saved_state.get(by_param[p], {})
                        for key, flat in (("exp_avg", bucket.exp_avg), ("exp_avg_sq", bucket.exp_avg_sq)):
                            view = bucket.view(flat, i)
                            if key in st:
                                view.copy_(st[key].reshape(view.shape))
                            else:
                                view.zero_()
                        if "step" in st:
                            steps.append(float(st["step"]))
                    bucket.step.fill_(max(steps, default=0.0))
                    if steps:
                        self._state_views(bucket)
                    else:
                        for p in bucket.params:
                            self.state.pop(p, None)


class AdamWMaster(AdamWBF16):
    """``torch.optim.AdamW`` on fp32 master weights, training bf16 compute weights (``optimizer="adamw_master"``).

    The model's trained parameters become bf16 (``compute_dtype``) views into one flat buffer per
    group; the optimizer keeps fp32 master weights and fp32 moments in flat buffers of its own. A
    step reads each bf16 gradient once, updates master and moments exactly as fused AdamW updates
    fp32 parameters, and writes the master rounded to nearest back into the compute weights, in a
    few large kernels (``torch.compile`` on CUDA). Against fp32 parameters under bf16 autocast
    (``"adamw"``) nothing is cast per forward and gradients are never held in fp32; the state is
    the same 16 bytes per parameter (4 master + 8 moments + 2 weight + 2 gradient). Gradients
    accumulate over micro-batches in bf16, and the forward computing with bf16 parameters keeps
    the embedding output and residual stream in bf16 (autocast over fp32 parameters keeps them fp32).

    The model's own parameters hold the rounded weights: save :meth:`master_state` (the engine's
    ``model_state_dict`` does) and restore with :meth:`load_master` to keep fp32 precision. The
    state dict has ``torch.optim.AdamW``'s layout (fp32 ``exp_avg`` / ``exp_avg_sq``, ``step``), so
    a checkpoint of either loads into the other.

    ``initial_masters`` (parameter -> fp32 tensor of its local shape) gives the masters' starting
    values for parameters that are already rounded to ``compute_dtype`` (FSDP2's bf16 shards); each
    entry is removed from the mapping as its bucket takes it, so the caller's copy is freed as the
    optimizer's own buffers fill.
    """

    _update = staticmethod(_update_chunk_master)
    memory_first = False  # one-backward steps copy their gradients in (see AdamWBF16.memory_first)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, compute_dtype: torch.dtype = torch.bfloat16,
                 chunk_elements: int | None = None, compile: bool | str = "auto", external: bool = False,
                 initial_masters: dict[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.compute_dtype = compute_dtype
        # fp32 starting values of parameters that are already bf16 (FSDP2's shards), by parameter:
        # consumed (and freed) as the buckets are built
        self._initial_masters = initial_masters
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         chunk_elements=chunk_elements, compile=compile, external=external)
        self._initial_masters = None

    def _bucket(self, params: list[torch.Tensor]) -> _FlatBucket:
        return _FlatBucket(params, compute_dtype=self.compute_dtype, moment_dtype=torch.float32, master=True,
                           external=self.external, initial_masters=self._initial_masters)

    @staticmethod
    def _run(kernel: Any, bucket: _FlatBucket, part: slice, lr: torch.Tensor, scale: torch.Tensor,
             keep: torch.Tensor, key: torch.Tensor, *hyper: float) -> None:
        assert bucket.master is not None
        w, g, master, m, v = (t[part] for t in (bucket.weights, bucket.grads, bucket.master, bucket.exp_avg,
                                                bucket.exp_avg_sq))
        kernel(w, g, master, m, v, lr, bucket.step, scale, keep, *hyper)

    def _masters(self) -> dict[torch.Tensor, torch.Tensor]:
        out = {}
        for buckets in self._buckets:
            for b in buckets:
                if not b.external:  # a weight assigned since the last step is taken in first
                    b.sync()
                assert b.master is not None
                for i, p in enumerate(b.params):
                    out[p] = b.view(b.master, i)
        return out

    def master_state(self, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``{name: fp32 master}`` for the trained parameters among ``named`` (``model.named_parameters()``)."""
        masters = self._masters()
        return {name: masters[p] for name, p in named if p in masters}

    @torch.no_grad()
    def load_master(self, named: Iterable[tuple[str, torch.Tensor]], state: dict[str, torch.Tensor]) -> None:
        """Set the masters (and the compute weights) of the trained parameters among ``named`` from
        ``state`` at full precision (a ``load_state_dict`` into the model alone rounds them)."""
        masters = self._masters()
        for name, p in named:
            if p in masters and name in state:
                masters[p].copy_(state[name].reshape(masters[p].shape))
                local_view(p).copy_(masters[p])
