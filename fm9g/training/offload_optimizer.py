"""`AdamWOffload`: the optimizer in host memory (``offload: true`` with the torch engine).

A full fine-tune keeps 16 bytes per trained parameter with AdamW (fp32 masters, two fp32 moments,
bf16 compute weights and gradients in :class:`~fm9g.training.optimizers.AdamWMaster`'s layout). This
optimizer keeps only the bf16 compute weights and gradients on the GPU (4 bytes) and the other 12
in host memory, where the update runs: what lets a 7B full fine-tune fit one 80 GB GPU at
``adamw``'s numerics, and a 70B fit 16 of them. Under FSDP2 each rank offloads its own shard.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from fm9g.training.optimizers import AdamWMaster, _FlatBucket

__all__ = ["AdamWOffload"]

#: elements per streamed chunk (32 MB of bf16 per staging buffer): on an H100 host with 16 threads
#: the update of 1e9 parameters took 0.33 s, against 0.50 s with 2**26 (`benchmarks/offload_step.py`)
CHUNK_ELEMENTS = 1 << 24


class AdamWOffload(AdamWMaster):
    """:class:`AdamWMaster` with the fp32 masters and moments in host memory and the update on the
    CPU (``offload: true``): the GPU keeps only the bf16 compute weights and gradients (4 bytes per
    trained parameter instead of 16), host memory the other 12.

    A step streams each flat gradient buffer to the host in chunks (pinned staging buffers, copied on
    a side stream one chunk ahead of the CPU), runs ``torch._fused_adamw_`` on the CPU over the
    chunk's fp32 master and moments (the same update as fused AdamW: clip coefficient as
    ``grad_scale``), and copies the master rounded to bf16 back into the compute weights. The step
    waits for the gradients and reads the non-finite flag on the host (a skipped step changes
    nothing). The state dict has ``torch.optim.AdamW``'s layout, as :class:`AdamWMaster`'s.

    Args:
        chunk_elements: elements per streamed chunk (default :data:`CHUNK_ELEMENTS`, 2**24).
        (the others as :class:`AdamWMaster`)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, compute_dtype: torch.dtype = torch.bfloat16,
                 chunk_elements: int | None = None, external: bool = False,
                 initial_masters: dict[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, compute_dtype=compute_dtype,
                         chunk_elements=chunk_elements or CHUNK_ELEMENTS, compile=False, external=external,
                         initial_masters=initial_masters)
        self._staging: dict[str, list[torch.Tensor]] = {}

    def _bucket(self, params: list[torch.Tensor]) -> _FlatBucket:
        return _FlatBucket(params, compute_dtype=self.compute_dtype, moment_dtype=torch.float32, master=True,
                           external=self.external, state_device=torch.device("cpu"),
                           initial_masters=self._initial_masters)

    def _stage(self, kind: str, dtype: torch.dtype, cuda: bool) -> list[torch.Tensor]:
        """Two host buffers of one chunk (pinned when the weights are on a GPU), made once."""
        if kind not in self._staging:
            n = int(self._chunk)
            self._staging[kind] = [torch.empty(n, dtype=dtype, pin_memory=cuda) for _ in range(2)]
        return self._staging[kind]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.found_inf is not None and bool(self.found_inf.item() > 0):  # a skipped step changes nothing
            return loss
        scale = None if self.grad_scale is None else self.grad_scale.detach().float().cpu().reshape(1)
        for g_idx, group in enumerate(self.param_groups):
            for bucket in self._buckets[g_idx]:
                bucket.sync()
                if bucket.params[0] not in self.state:
                    self._state_views(bucket)
                bucket.step.add_(1)
                self._update_bucket(bucket, group, scale)
                if bucket.external:
                    bucket.write_back()
        return loss

    def _update_bucket(self, bucket: _FlatBucket, group: dict[str, Any], scale: torch.Tensor | None) -> None:
        """Stream one bucket through the CPU update, a chunk at a time (the next chunk's gradients are
        copied to the host while the CPU updates this one)."""
        assert bucket.master is not None
        cuda = bucket.weights.device.type == "cuda"
        size = int(self._chunk)
        grads_in = self._stage("grads", bucket.grads.dtype, cuda)
        weights_out = self._stage("weights", bucket.weights.dtype, cuda)
        g32 = self._stage("fp32", torch.float32, False)[0]
        spans = [(a, min(a + size, bucket.weights.numel())) for a in range(0, bucket.weights.numel(), size)]
        side = torch.cuda.Stream(bucket.weights.device) if cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(bucket.weights.device))  # the gradients are ready
        fetched = self._fetch(bucket.grads, spans[0], grads_in[0], side)
        sent: list[Any] = [None, None]
        beta1, beta2 = group["betas"]
        lr = float(group["lr"]) if not isinstance(group["lr"], torch.Tensor) else float(group["lr"].item())
        for j, (a, b) in enumerate(spans):
            if fetched is not None:
                fetched.synchronize()
            g32[:b - a].copy_(grads_in[j % 2][:b - a])
            if j + 1 < len(spans):
                fetched = self._fetch(bucket.grads, spans[j + 1], grads_in[(j + 1) % 2], side)
            torch._fused_adamw_([bucket.master[a:b]], [g32[:b - a]], [bucket.exp_avg[a:b]], [bucket.exp_avg_sq[a:b]],
                                [], [bucket.step], lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                eps=group["eps"], amsgrad=False, maximize=False, grad_scale=scale, found_inf=None)
            if sent[j % 2] is not None:
                sent[j % 2].synchronize()  # the staging buffer's last copy to the GPU is done
            out = weights_out[j % 2][:b - a]
            out.copy_(bucket.master[a:b])
            sent[j % 2] = self._send(out, bucket.weights[a:b], side)
        if side is not None:
            torch.cuda.current_stream(bucket.weights.device).wait_stream(side)

    @staticmethod
    def _fetch(src: torch.Tensor, span: tuple[int, int], dst: torch.Tensor, side: Any) -> Any:
        """Copy ``src[span]`` into the host buffer ``dst`` (on the side stream); returns its event."""
        a, b = span
        if side is None:
            dst[:b - a].copy_(src[a:b])
            return None
        with torch.cuda.stream(side):
            dst[:b - a].copy_(src[a:b], non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return done

    @staticmethod
    def _send(src: torch.Tensor, dst: torch.Tensor, side: Any) -> Any:
        """Copy the host chunk ``src`` into ``dst`` on the device (on the side stream); returns its event."""
        if side is None:
            dst.copy_(src)
            return None
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return done
