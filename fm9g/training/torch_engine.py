"""`TorchEngine`: the ``torch`` engine, one training step for one process and for FSDP2 across many.

The engine takes a built model and applies what the run asks for (:mod:`fm9g.training.parallelize`):
activation checkpointing, compiled layers (replayed as CUDA graphs on one GPU) and, with a device
mesh, FSDP2 (``fully_shard`` per decoder layer). The step is the same in every
case; with a mesh it adds the collectives (the step's label count and figures summed over the
ranks, the gradient norm over the shards) and the optimizer works on each rank's shard.

Precision: on CUDA bf16 autocast. The optimizer (``TrainConfig.optimizer``):

- ``"adamw"``: fp32 weights and moments, fused AdamW (over each rank's fp32 shard under FSDP2,
  which gathers the weights in bf16 and reduces gradients in fp32);
- ``"adamw_master"``: bf16 compute weights, fp32 masters and moments held by the optimizer in
  flat buffers (:class:`~fm9g.training.optimizers.AdamWMaster`); under FSDP2 the shards are the
  bf16 compute weights (gathered and reduced in bf16, no cast) and the optimizer keeps fp32
  masters of each rank's shard;
- ``"adamw_bf16"``: bf16 weights, gradients and moments (:class:`~fm9g.training.optimizers.AdamWBF16`).

The step never waits for the device: clipping and the non-finite skip are folded into the update
(``grad_scale`` divides each gradient as the kernel reads it; ``found_inf`` makes the kernel leave
weights, moments and step counts untouched), and the figures come back as a deferred
:class:`~fm9g.training.engine.StepOutput`; on CUDA the Trainer may queue the next step before
reading them (:attr:`TorchEngine.launch_ahead`). With ``offload`` the fp32 masters and moments live
in host memory and the update runs on the CPU (:class:`~fm9g.training.offload_optimizer.AdamWOffload`):
the GPU keeps 4 bytes per trained parameter (bf16 weights and gradients, sharded under FSDP2), and
the step waits for the gradients.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from torch import nn

from fm9g.training.config import OPTIMIZERS
from fm9g.training.engine import REDUCE_OPS, StepOutput, deferred_step_output
from fm9g.training.offload_optimizer import AdamWOffload
from fm9g.training.optimizers import AdamWBF16, AdamWMaster, _to_device
from fm9g.training.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    gather_full,
    is_sharded,
    load_full_state_into_shards,
    local_slice,
    local_view,
    share_shard_storage,
    shard_rows,
)
from fm9g.training.step_math import (
    check_optimizer_state,
    clip_coefficient,
    max_seqlen,
    n_tasks,
    param_groups,
    peak_flops_of,
    stage_batch,
    task_sums,
    total_norm,
)

__all__ = ["TorchEngine"]


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec!r} but CUDA is not available; use device='cpu' or 'auto'")
    return dev


def _resolve_cuda_graphs(value: bool | str, device: torch.device, compile: bool, model: nn.Module,
                         sharded: bool) -> bool:
    """Whether the compiled layers replay as CUDA graphs (``TrainConfig.cuda_graphs``).

    ``"auto"``: on for compiled layers on one CUDA device without activation checkpointing and
    without FSDP2. ``True`` where it cannot work is an error that says which setting to change.
    """
    if value not in (True, False, "auto"):
        raise ValueError(f"cuda_graphs must be true, false or \"auto\", got {value!r}")
    checkpointing = bool(getattr(model, "gradient_checkpointing", False))
    usable = (device.type == "cuda" and compile and bool(getattr(getattr(model, "encoder", None), "layers", None))
              and hasattr(model, "graphed_layers"))
    if value == "auto":
        return usable and not checkpointing and not sharded
    if not value:
        return False
    problem = None
    if device.type != "cuda":
        problem = f"needs a CUDA device, the run is on {device}"
    elif not compile:
        problem = "replays the compiled layers: set compile=true (or \"auto\")"
    elif not usable:
        problem = f"needs a model with encoder.layers and graphed_layers (FM9GModel), {type(model).__name__} has not"
    elif checkpointing:
        problem = ("does not combine with activation checkpointing (the recompute would run a recorded graph inside "
                   "the backward): set use_checkpoint=false")
    elif sharded:
        problem = ("does not combine with FSDP2: its hooks gather each layer's weights into storage that is freed "
                   "and re-allocated around every forward and backward, which a recorded graph cannot follow")
    if problem:
        raise ValueError(f"cuda_graphs=true {problem}; or set cuda_graphs=false")
    return True


def _compute_dtypes(model: nn.Module, precision: str, optimizer: str, sharded: bool,
                    shard: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """Give the parameters the dtypes they train in; return the fp32 values a flat optimizer's
    masters must start from when the parameters become bf16 here (FSDP2 with ``adamw_master``):
    only the rows this rank will hold (``shard`` = its place in the shard group, ``(rank, size)``),
    in host memory, so that no rank holds a whole fp32 model beside its offloaded optimizer state.

    fp32: everything fp32 (buffers too, as ``model.float()``). bf16: trained parameters fp32 and
    frozen ones (a LoRA run's base) bf16; with ``adamw_bf16`` the trained ones bf16 too (it keeps no
    fp32 copy); with ``adamw_master`` fp32, which the optimizer turns into bf16 compute weights
    itself - except under FSDP2, whose shards ARE the compute weights: bf16 here.
    """
    if precision == "fp32":
        model.float()
        return {}
    masters: dict[str, torch.Tensor] = {}
    bf16_trained = optimizer == "adamw_bf16" or (optimizer == "adamw_master" and sharded)
    for name, p in model.named_parameters():
        want = torch.bfloat16 if (not p.requires_grad or bf16_trained) else torch.float32
        if not p.is_floating_point() or p.dtype == want:
            continue
        if p.requires_grad and optimizer == "adamw_master" and p.device.type != "meta":
            masters[name] = shard_rows(p.data, *shard).to("cpu")  # until the optimizer holds them: off the GPU
        p.data = p.data.to(want)
    return masters


class TorchEngine:
    """The ``torch`` engine: CPU, one GPU, or FSDP2 over a device mesh (see the module docstring).

    Args:
        model: the built model (moved to the device here). With ``mesh`` it may live on the meta
            device (``on_meta``): it is materialised empty after sharding and its weights are
            loaded with :meth:`load_model_state_dict` (see ``fm9g.training.builders.build_engine``).
        lr: peak learning rate (each step passes the scheduled one).
        weight_decay, betas, eps: AdamW settings (decoupled weight decay on every parameter, as
            the original).
        clip_grad: max global L2 norm (<= 0: no clipping; the norm is still computed).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU) | ``"bf16"`` | ``"fp32"``.
        lr_scale_width: muP width ratio (1 = no muP learning-rate groups).
        use_checkpoint: activation checkpointing on/off (None leaves the model's setting).
        compile: ``torch.compile`` each decoder layer; ``"auto"``: on CUDA only.
        lora_only: only LoRA tensors are trained/saved.
        peak_flops: dense bf16 FLOP/s of the device for MFU (None: from the GPU name).
        optimizer: ``"adamw"`` | ``"adamw_master"`` | ``"adamw_bf16"`` (module docstring).
        seed: seeds ``adamw_bf16``'s rounding noise.
        cuda_graphs: replay the compiled layers as CUDA graphs; ``"auto"``: on for compiled layers
            on one CUDA device without activation checkpointing or FSDP2.
        mesh: a DeviceMesh: shard the model with FSDP2 over it (None: one process, no sharding).
        reshard_after_forward: FSDP2: free each layer's gathered weights after its forward.
        offload: the optimizer (fp32 masters and moments, the update) in host memory and on the CPU;
            with ``adamw`` or ``adamw_master`` (the same numerics), one process or FSDP2.
        on_meta: the model was built on the meta device (``mesh`` required).
    """

    name = "torch"
    _micro_batches = 1  # of the last step: how zero_grad() clears a flat-buffer optimizer

    def __init__(self, model: nn.Module, *, lr: float = 1e-4, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, clip_grad: float = 1.0,
                 device: str = "auto", precision: str = "auto", lr_scale_width: float = 1.0,
                 use_checkpoint: bool | None = None, compile: bool | str = False, lora_only: bool = False,
                 peak_flops: float | None = None, optimizer: str = "adamw", seed: int = 0,
                 cuda_graphs: bool | str = False, mesh: Any = None, reshard_after_forward: bool = True,
                 offload: bool = False, on_meta: bool = False) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if on_meta and mesh is None:
            raise ValueError("a model on the meta device needs FSDP2: pass a mesh (TrainConfig.data_parallel: \"fsdp\")")
        if offload and optimizer == "adamw_bf16":
            raise ValueError("offload=true keeps fp32 masters and moments in host memory (adamw / adamw_master); "
                             "adamw_bf16 keeps its 8 bytes per parameter on the GPU: choose one of the two")
        self.device = _resolve_device(device)
        self.precision = precision if precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.optimizer_name, self._seed, self.clip_grad, self.lora_only = optimizer, seed, clip_grad, lora_only
        self._peak, self.mesh, self.offload = peak_flops, mesh, offload
        self.rank, self.world_size, self._shard_group = _mesh_position(mesh)
        # offload trains bf16 compute weights against fp32 masters in host memory, as adamw_master
        masters = _compute_dtypes(model, self.precision, "adamw_master" if offload else optimizer, mesh is not None,
                                  shard=_shard_position(mesh))
        if not on_meta:  # before sharding: a 7B goes to the GPU in bf16, never in fp32
            model.to(self.device)
        apply_activation_checkpointing(model, use_checkpoint)
        if compile == "auto":
            compile = self.device.type == "cuda"
        self.cuda_graphs = _resolve_cuda_graphs(cuda_graphs, self.device, bool(compile), model, mesh is not None)
        if compile:
            apply_compile(model, cuda_graphs=self.cuda_graphs)
        if mesh is not None:
            self._shard(model, reshard_after_forward, on_meta)
        self.model = model
        # the fp32 rows by parameter, handed to the flat optimizer, which frees each as it takes it
        initial = {p: masters.pop(n) for n, p in model.named_parameters() if n in masters}
        self._setup_optimizer(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lr_scale_width=lr_scale_width,
                              initial_masters=initial)
        self._gradient_sync: bool | None = None  # FSDP2's requires_gradient_sync as last set
        # The learning rate lives on the device for every step of such a run, queued ahead or not,
        # so both paths compute with the same fp32 value.
        self._device_lr = self.device.type == "cuda" and self._skip_on_device and not offload
        self.launch_ahead = self._device_lr

    # ------------------------------------------------------------------ building
    def _shard(self, model: nn.Module, reshard_after_forward: bool, on_meta: bool) -> None:
        """FSDP2 over ``self.mesh``: gathered in bf16 and reduced in fp32 for fp32 shards (``adamw``),
        no cast for bf16 shards (the flat optimizers, offload)."""
        fp32_shards = self.precision == "bf16" and self.optimizer_name == "adamw" and not self.offload
        apply_fsdp(model, self.mesh, param_dtype=torch.bfloat16 if fp32_shards else None,
                   reduce_dtype=torch.float32 if fp32_shards else None, reshard_after_forward=reshard_after_forward)
        if on_meta:
            model.to_empty(device=self.device)

    def _setup_optimizer(self, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                         lr_scale_width: float, initial_masters: dict[torch.Tensor, torch.Tensor] | None = None) -> None:
        """muP parameter groups and the optimizer over what each rank updates: the parameters, or
        under FSDP2 their local shards (fused AdamW updates those in place; the flat optimizers
        keep copies and write the updated weights back)."""
        self.groups = param_groups(self.model, lr_scale_width)
        if not self.groups:
            raise ValueError("the model has no trainable parameters")
        self.params = [p for g in self.groups for p in g["params"]]
        sharded = self.mesh is not None
        flat = self.optimizer_name != "adamw" or self.offload
        self._shards = [local_view(p) for p in self.params] if sharded and not flat else None
        # which trained parameters are FSDP2 shards (fixed once sharded); the others every rank keeps
        # whole, their gradients summed by the engine
        self._sharded = [is_sharded(p) for p in self.params]
        self._whole = [p for p, s in zip(self.params, self._sharded) if not s] if sharded else []
        opt_params = iter(self._shards or self.params)
        opt_groups = [{"params": [next(opt_params) for _ in g["params"]], "lr": lr * g["lr_scale"],
                       "lr_scale": g["lr_scale"]} for g in self.groups]
        kw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._skip_on_device = True  # the update reads grad_scale / found_inf: no host sync
        compute = torch.bfloat16 if self.precision == "bf16" else torch.float32
        if self.offload:  # the update on the CPU (it reads found_inf there: one wait per step)
            self.optimizer = AdamWOffload(opt_groups, compute_dtype=compute, external=sharded,
                                          initial_masters=initial_masters, **kw)
        elif self.optimizer_name == "adamw_bf16":
            self.optimizer = AdamWBF16(opt_groups, seed=self._seed, external=sharded, **kw)
        elif self.optimizer_name == "adamw_master":
            self.optimizer = AdamWMaster(opt_groups, compute_dtype=compute, external=sharded,
                                         initial_masters=initial_masters, **kw)
        else:
            try:  # fused AdamW: one kernel per step on CUDA, and about 2x the single-tensor speed on CPU
                self.optimizer = torch.optim.AdamW(opt_groups, fused=True, **kw)
            except (RuntimeError, TypeError, ValueError):  # a device / dtype without a fused kernel
                self.optimizer = torch.optim.AdamW(opt_groups, foreach=False, **kw)
            self._skip_on_device = bool(self.optimizer.defaults.get("fused"))
        if sharded and hasattr(self.optimizer, "shard_storage"):
            # FSDP2 keeps the shards in the flat weights the update writes: no copy back per step
            share_shard_storage(self.model, self.optimizer.shard_storage())

    def _load_masters(self, full: Mapping[str, torch.Tensor]) -> None:
        """Set an ``adamw_master`` optimizer's fp32 masters (and the compute weights) from full
        fp32 tensors by name (this rank's rows of each)."""
        if not isinstance(self.optimizer, AdamWMaster):
            return
        named = [(n, p) for n, p in self.model.named_parameters() if n in full and p.requires_grad]
        self.optimizer.load_master(named, {n: local_slice(full[n], p) for n, p in named})

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ collectives (identity in one process)
    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every rank, in place (one process: itself)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def _sum_whole_grads(self) -> None:
        """The gradients of the parameters every rank keeps whole (not FSDP2's: norms, biases,
        :func:`~fm9g.training.parallelize.replicated_params`) summed over every rank, in place, as
        FSDP2 sums its shards'; one collective per dtype (one process: nothing to do)."""
        if self.world_size == 1 or not self._whole:
            return
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self._whole:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def _global_norm(self, grads: list[torch.Tensor], sharded: list[bool], *, foreach: bool) -> torch.Tensor:
        """The global L2 norm of ``grads`` (0-d fp32 on the first one's device): the squares of FSDP2's
        shards (``sharded``) summed over the shard group, those of the parameters every rank keeps
        whole counted once (replicas of a hybrid mesh hold the same shards)."""
        device = grads[0].device if grads else self.device
        if self._shard_group is None:
            return total_norm(grads, foreach=foreach).to(device)
        import torch.distributed as dist

        local = total_norm([g for g, s in zip(grads, sharded) if s], foreach=foreach).to(device)
        sq = (local.float() ** 2).reshape(1)
        dist.all_reduce(sq, group=self._shard_group)
        whole = total_norm([g for g, s in zip(grads, sharded) if not s], foreach=foreach).to(device)
        return (sq + whole.float() ** 2).sqrt().reshape(())

    # ------------------------------------------------------------------ the step
    def _step_counts(self, micro_batches: list[dict[str, Any]]) -> tuple[int, int] | torch.Tensor:
        """Labelled and real tokens of the step over all ranks: host ints when every batch carries
        them in one process, else a float64 device tensor [2] (summed over the ranks before backward)."""
        n_label = [b.get("num_label_tokens") if b.get("num_label_tokens") is not None
                   else (b["labels"] != -100).sum() for b in micro_batches]
        n_tok = [b.get("num_tokens") if b.get("num_tokens") is not None else b["input_ids"].numel()
                 for b in micro_batches]
        on_host = all(not isinstance(v, torch.Tensor) or v.device.type == "cpu" for v in n_label + n_tok)
        if on_host and self.world_size == 1:
            return sum(int(v) for v in n_label), sum(int(v) for v in n_tok)
        if on_host:
            counts = _to_device(torch.tensor([sum(int(v) for v in n_label), sum(int(v) for v in n_tok)],
                                             dtype=torch.float64), self.device)
        else:
            dev = [torch.as_tensor(v, dtype=torch.float64).to(self.device, non_blocking=True) for v in n_label + n_tok]
            k = len(micro_batches)
            counts = torch.stack([torch.stack(dev[:k]).sum(), torch.stack(dev[k:]).sum()])
        return self._sum_over_ranks(counts)

    def _step_lr(self, lr: float, after: StepOutput | None, lr_if_skipped: float | None) -> float | torch.Tensor:
        """The peak learning rate of this step: a float, or an fp32 device tensor on a CUDA run
        (``lr`` if the queued step ``after`` updates the weights, else ``lr_if_skipped``)."""
        if after is None or lr_if_skipped is None:
            return _to_device(torch.tensor(lr, dtype=torch.float32), self.device) if self._device_lr else lr
        if after.ready or getattr(after, "device_finite", None) is None:  # known on the host (an OOM skip)
            return self._step_lr(lr if not after.skipped else lr_if_skipped, None, None)
        if not self._device_lr:
            raise RuntimeError("this engine reads the learning rate on the host; it cannot queue a step ahead")
        pair = _to_device(torch.tensor([lr, lr_if_skipped], dtype=torch.float32), self.device)
        return torch.where(after.device_finite, pair[0], pair[1])

    def train_step(self, micro_batches: list[dict[str, Any]], lr: float, *, after: StepOutput | None = None,
                   lr_if_skipped: float | None = None) -> StepOutput:
        """One optimizer step over ``micro_batches`` (this rank's packed batch dicts, see fm9g.data.packing).

        Each batch needs ``input_ids`` and ``labels`` [B, T]; optional ``position_ids`` [B, T],
        ``cu_seqlens`` [n+1], ``task_ids`` [B, T] (with ``task_names``), ``max_seqlen``,
        ``num_tokens``, ``num_label_tokens``. The returned figures are global and deferred (read on
        first use).

        ``after`` / ``lr_if_skipped`` (only when :attr:`launch_ahead`): this step is queued behind
        the step ``after``, whose figures are not read yet; it trains with ``lr`` if ``after``
        updates the weights and with ``lr_if_skipped`` if ``after`` is skipped, chosen on the device.
        """
        step_lr = self._step_lr(lr, after, lr_if_skipped)
        self._micro_batches = len(micro_batches)
        counts = self._step_counts(micro_batches)
        k = n_tasks(micro_batches)
        sums = self._forward_backward(micro_batches, counts, k)
        norm, grads = self._grad_norm()
        finite = torch.isfinite(sums[0]).to(norm.device) & torch.isfinite(norm)
        for g in self.optimizer.param_groups:
            g["lr"] = step_lr * g["lr_scale"]
        self._update(grads, clip_coefficient(norm, self.clip_grad), finite)
        for g in self.optimizer.param_groups:  # a float again in state dicts (the kernels hold the tensor)
            g["lr"] = lr * g["lr_scale"]
        self.zero_grad()
        host_counts = None if isinstance(counts, torch.Tensor) else counts
        count_vec = counts if host_counts is None else torch.zeros(2, device=self.device, dtype=torch.float64)
        figures = torch.cat([sums[:1], count_vec.double(), norm.to(self.device).double().reshape(1),
                             finite.to(self.device).double().reshape(1), sums[1:]])
        return deferred_step_output(figures, k, counts=host_counts)

    def _forward_backward(self, micro_batches: list[dict[str, Any]], counts: tuple[int, int] | torch.Tensor,
                          k: int) -> torch.Tensor:
        """Forward and backward every micro-batch, each dividing its summed token loss by the step's
        global label count; returns the float64 device vector [loss sum, per task (loss, labels,
        tokens) for ``k`` tasks] summed over the ranks."""
        denom = counts[0].clamp(min=1).float() if isinstance(counts, torch.Tensor) else float(max(counts[0], 1))
        sums = torch.zeros(1 + 3 * k, device=self.device, dtype=torch.float64)
        if not self.model.training:  # train() walks every module (~1 ms a step for a 24-layer model)
            self.model.train()
        if self.cuda_graphs and len(micro_batches) > 1:
            self._grads_outside_graphs()
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            if self.mesh is not None and self._gradient_sync != (i == last):
                # reduce-scatter once per step; set only on a change (each call walks every module:
                # 267 us for W1@host's 366 modules on the development CPU, per micro-batch)
                self._gradient_sync = i == last
                self.model.set_requires_gradient_sync(i == last)
            b = stage_batch(batch, self.device)
            if self.cuda_graphs:  # the graphs' outputs of the last forward/backward are consumed
                torch.compiler.cudagraph_mark_step_begin()
            with self._autocast():
                out = self.model(b["input_ids"], position_ids=b.get("position_ids"), cu_seqlens=b.get("cu_seqlens"),
                                 max_seqlen=max_seqlen(b), labels=b["labels"])
            s = out.token_loss.float().sum()
            (s / denom).backward()
            sums[0] += s.detach()
            if k and b.get("task_ids") is not None:
                sums[1:] += task_sums(out.token_loss.detach(), b["labels"], b["task_ids"], k).reshape(-1)
        return self._sum_over_ranks(sums)

    def _grad_norm(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The global pre-clip L2 norm (0-d fp32, on the gradients' device) and the gradients the
        update divides (``[]`` for flat-buffer optimizers, which clip inside their step)."""
        self._sum_whole_grads()
        if hasattr(self.optimizer, "flat_grads"):  # one reduction per whole buffer
            flat = self.optimizer.flat_grads()
            return self._global_norm(flat, self.optimizer.flat_grads_sharded(), foreach=False), []
        if self._shards is not None:  # FSDP2 + fused AdamW: the optimizer's tensors take the local gradients
            for s, p in zip(self._shards, self.params):
                s.grad = local_view(p.grad) if p.grad is not None else None
        pairs = [(t.grad, s) for t, s in zip(self._shards or self.params, self._sharded) if t.grad is not None]
        grads = [g for g, _ in pairs]
        foreach = bool(grads) and grads[0].device.type == "cuda"
        return self._global_norm(grads, [s for _, s in pairs], foreach=foreach), grads

    def _update(self, grads: list[torch.Tensor], clip_coef: torch.Tensor | None, finite: torch.Tensor) -> None:
        """The AdamW step: gradients divided by ``clip_coef``; nothing changes unless ``finite``.

        With fused AdamW and the flat optimizers both happen inside the kernel (``grad_scale`` /
        ``found_inf``), without a host sync; otherwise the flag is read here and the gradients are
        divided in place.
        """
        if self._skip_on_device:
            self.optimizer.grad_scale = clip_coef
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                self.optimizer.grad_scale = None
                self.optimizer.found_inf = None
            return
        if not bool(finite):
            return
        if clip_coef is not None and grads:
            torch._foreach_div_(grads, clip_coef.to(grads[0].device))
        self.optimizer.step()

    def zero_grad(self) -> None:
        """Drop the step's gradients (after every step, and after a skipped one).

        In one process they are zeroed in place (backward adds onto them) after a step of several
        micro-batches: a flat-buffer optimizer then holds no second set, and with CUDA graphs no
        gradient lives in the graphs' memory. ``adamw_bf16`` always keeps them (memory first);
        otherwise they are dropped (``adamw_master`` copies the next ones in at the step: one copy
        instead of a fill and an add). Under FSDP2 the sharded gradients are always dropped (FSDP2
        accumulates over micro-batches itself).
        """
        if self.mesh is not None:
            for p in self.params:
                p.grad = None
            self.optimizer.zero_grad(set_to_none=True)
            return
        flat = hasattr(self.optimizer, "flat_grads")
        several = self._micro_batches > 1
        in_place = (several and (flat or self.cuda_graphs)) or (flat and self.optimizer.memory_first)
        self.optimizer.zero_grad(set_to_none=not in_place)

    def _grads_outside_graphs(self) -> None:
        """With CUDA graphs and several micro-batches, backward adds into gradients held outside the
        graphs' memory: a gradient taken over from a recorded backward's output would be written
        over by the next micro-batch's replay (torch then stops with an error)."""
        if hasattr(self.optimizer, "flat_grads"):
            if any(p.grad is None for p in self.params):
                self.optimizer.zero_grad(set_to_none=False)  # views into the flat buffer, zeroed
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    # ------------------------------------------------------------------ protocol
    @property
    def is_main(self) -> bool:
        """``rank == 0``: the only process that prints and writes shared files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        """``values`` reduced over the ranks (``sum`` | ``max`` | ``min`` | ``mean``); themselves in one process."""
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op={op!r}: expected one of {', '.join(REDUCE_OPS)}")
        if self.world_size == 1 or not values:
            return dict(values)
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
        if op == "mean":
            t /= self.world_size
        return dict(zip(keys, t.tolist()))

    # ------------------------------------------------------------------ state
    def model_state_dict(self, *, lora_only: bool = False) -> dict[str, torch.Tensor]:
        """The full state in the original names on CPU (fp32 masters for ``adamw_master``) on the
        main rank, ``{}`` on the others. Collective under FSDP2."""
        if self.mesh is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif lora_only:
            from fm9g.models.lora import lora_state_dict

            sd = lora_state_dict(self.model)
        else:
            sd = self.model.state_dict()
        if lora_only:
            from fm9g.models.lora import is_lora_name

            sd = {k: v for k, v in sd.items() if is_lora_name(k)}
        if isinstance(self.optimizer, AdamWMaster):  # the fp32 masters, not the bf16 compute weights
            # every rank gathers every master (collective); only names of this state dict are kept
            named = list(self.model.named_parameters(remove_duplicate=False))
            masters = self.optimizer.master_state(named)
            full = {n: gather_full(masters[n], p) for n, p in named if n in masters}
            sd.update({n: t for n, t in full.items() if n in sd})
        if not self.is_main:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

    def load_model_state_dict(self, state: Mapping[str, torch.Tensor], *, lora_only: bool = False,
                              names: list[str] | None = None, source: str = "checkpoint") -> None:
        """Load a full state strictly (every rank passes it; it may be a lazily loaded mapping and
        each rank reads only its rows); ``lora_only``: the LoRA tensors; ``names``: only these keys."""
        if lora_only:
            from fm9g.models.lora import is_lora_name

            names = [n for n, _ in self.model.named_parameters() if is_lora_name(n)]
        if self.mesh is None and names is None:
            from fm9g.training.checkpoint import load_state_dict_checked

            load_state_dict_checked(self.model, state, source=source)
        else:
            load_full_state_into_shards(self.model, state, names=names, source=source)
        if getattr(self.optimizer, "external", False):
            self.optimizer.reload_weights()  # the flat copies take the loaded shards
        self._load_masters(state)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """THIS rank's optimizer state (plain tensors of its shard; loads with weights_only=True)."""
        sd = self.optimizer.state_dict()
        if self.mesh is not None:
            sd = {**sd, "world_size": self.world_size, "rank": self.rank}
        return sd

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state_dict` of this rank (same world size and parameters)."""
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise ValueError(
                f"the optimizer state was saved by {saved_world} rank(s) but this run has {self.world_size}; "
                "the per-rank optimizer files only fit the same world size: resume with the same number of "
                "processes, use checkpoint_format=\"sharded\", or set only_load_model=true (weights only, fresh "
                "optimizer) - see docs/distributed.md")
        check_optimizer_state(state, self.optimizer.param_groups)
        self.optimizer.load_state_dict({k: v for k, v in state.items() if k in ("state", "param_groups")})

    def memory_stats(self) -> dict[str, float]:
        """Device memory in GiB: ``allocated``, ``peak`` (``{}`` on CPU)."""
        if self.device.type != "cuda":
            return {}
        return {"allocated": torch.cuda.memory_allocated(self.device) / 2**30,
                "peak": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def peak_flops(self) -> float | None:
        """Dense bf16 peak FLOP/s of the device (the config's ``peak_flops``, else from the GPU name)."""
        return self._peak or peak_flops_of(self.device)

    # ------------------------------------------------------------------ sharded checkpoints (DCP)
    def save_sharded(self, folder: Any) -> None:
        """Every rank writes its shards of the model and optimizer (``torch.distributed.checkpoint``)."""
        from fm9g.training.sharded_state import save_sharded

        save_sharded(self, folder)

    def load_sharded(self, folder: Any, *, model_only: bool = False) -> None:
        """Load what :meth:`save_sharded` wrote, re-sharded to this world size."""
        from fm9g.training.sharded_state import load_sharded

        load_sharded(self, folder, model_only=model_only)


def _shard_mesh(mesh: Any) -> Any:
    """The 1-D mesh FSDP2 shards over: ``mesh`` itself, or the ``"shard"`` dimension of a hybrid one."""
    return mesh["shard"] if mesh.ndim > 1 else mesh


def _shard_position(mesh: Any) -> tuple[int, int]:
    """``(rank within the shard group, shard group size)`` of this process on ``mesh``: which
    rows of each sharded parameter it holds (``(0, 1)`` without a mesh)."""
    if mesh is None:
        return 0, 1
    shard = _shard_mesh(mesh)
    return shard.get_local_rank(), shard.size()


def _mesh_position(mesh: Any) -> tuple[int, int, Any]:
    """``(rank, world_size, shard process group or None)`` of this process on ``mesh``."""
    if mesh is None:
        return 0, 1, None
    import torch.distributed as dist

    shard = _shard_mesh(mesh)
    group = shard.get_group() if shard.size() > 1 else None
    return dist.get_rank(), dist.get_world_size(), group
