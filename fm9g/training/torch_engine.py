"""`TorchEngine`: the one-process engine (CPU or one GPU) behind the :class:`~fm9g.training.engine.Engine` protocol.

fp32 master weights for what trains and fused AdamW; on CUDA bf16 autocast. A LoRA run's frozen
base is held in bf16 under bf16 precision (nothing to cast per step; only the LoRA tensors are
fp32). In one process every figure of a step is already global, ``barrier`` is a no-op and
``all_reduce`` the identity.

The step never waits for the device: clipping and the non-finite skip are folded into the fused
AdamW kernel (``grad_scale`` divides each gradient as the kernel reads it; ``found_inf`` makes the
kernel leave weights, moments and step counts untouched), and the figures come back as a deferred
:class:`~fm9g.training.engine.StepOutput`. :class:`~fm9g.training.fsdp_engine.FSDPEngine` runs the
same step; it overrides the hooks marked below (collectives, gradient sync, the update).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from fm9g.training.checkpoint import load_state_dict_checked
from fm9g.training.config import OPTIMIZERS
from fm9g.training.optimizers import AdamWBF16, AdamWMaster, _to_device
from fm9g.training.engine import (
    _PEAKS,
    check_optimizer_state,
    StepOutput,
    _max_seqlen,
    _n_tasks,
    _task_sums,
    deferred_step_output,
    param_groups,
    stage_batch,
)

__all__ = ["TorchEngine"]


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec!r} but CUDA is not available; use device='cpu' or 'auto'")
    return dev


def _resolve_cuda_graphs(value: bool | str, device: torch.device, compile: bool, model: nn.Module) -> bool:
    """Whether the compiled layers replay as CUDA graphs (``TrainConfig.cuda_graphs``).

    ``"auto"``: on for compiled layers on CUDA without activation checkpointing. ``True`` where it
    cannot work is an error that says which setting to change.
    """
    if value not in (True, False, "auto"):
        raise ValueError(f"cuda_graphs must be true, false or \"auto\", got {value!r}")
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    checkpointing = bool(getattr(model, "gradient_checkpointing", False))
    usable = device.type == "cuda" and compile and layers is not None and hasattr(model, "graphed_layers")
    if value == "auto":
        return usable and not checkpointing
    if not value:
        return False
    if device.type != "cuda":
        raise ValueError(f"cuda_graphs=true needs a CUDA device, the run is on {device}: set cuda_graphs=false")
    if not compile:
        raise ValueError("cuda_graphs=true replays the compiled layers: set compile=true (or \"auto\"), "
                         "or cuda_graphs=false")
    if not usable:
        raise ValueError(f"cuda_graphs=true needs a model with encoder.layers and graphed_layers (FM9GModel); "
                         f"{type(model).__name__} has not: set cuda_graphs=false")
    if checkpointing:
        raise ValueError("cuda_graphs=true does not combine with activation checkpointing (the recompute would "
                         "run a recorded graph inside the backward): set use_checkpoint=false or cuda_graphs=false")
    return True


def _set_dtypes(model: nn.Module, precision: str, optimizer: str = "adamw") -> None:
    """fp32 for every trainable parameter; under bf16 the frozen ones (a LoRA run's base) in bf16,
    under fp32 everything fp32 (buffers too, as ``model.float()``). With ``adamw_bf16`` under bf16
    the trained parameters are bf16 too (that optimizer keeps no fp32 copy); ``adamw_master`` takes
    them in fp32 and makes them bf16 itself, keeping the fp32 values as its masters."""
    if precision == "fp32":
        model.float()
        return
    for p in model.parameters():
        want = torch.float32 if (p.requires_grad and optimizer != "adamw_bf16") else torch.bfloat16
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)


def _total_norm(grads: list[torch.Tensor], *, foreach: bool) -> torch.Tensor:
    """The L2 norm of all ``grads`` together, accumulated in fp32 also for bf16 gradients (whose
    own norm would come back rounded to bf16's 8 bits: a grad_norm of 62.0, 64.0, 63.5)."""
    if not grads or all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, 2.0, foreach=foreach)
    if foreach:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    else:
        norms = [torch.linalg.vector_norm(g, 2.0, dtype=torch.float32) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


class TorchEngine:
    """Single-process engine: CPU or one GPU.

    Args:
        model: the built model (moved to the device here; what trains becomes fp32).
        lr: peak learning rate (each step passes the scheduled one).
        weight_decay, betas, eps: AdamW settings (decoupled weight decay on every parameter, as
            the original).
        clip_grad: max global L2 norm (<= 0: no clipping; the norm is still computed).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU) | ``"bf16"`` | ``"fp32"``.
            Under bf16 the frozen parameters (a LoRA run's base) are held in bf16.
        lr_scale_width: muP width ratio (1 = no muP learning-rate groups).
        use_checkpoint: activation checkpointing on/off (None leaves the model's setting).
        compile: ``torch.compile`` each transformer layer (``model.encoder.layers``) in place;
            ``"auto"``: on CUDA only (1.3-1.4x the eager step on an H100, see benchmarks/RESULTS.md in the repository).
        lora_only: only LoRA tensors are trained/saved.
        peak_flops: dense bf16 FLOP/s of the device for MFU (None: from the GPU name).
        optimizer: ``"adamw"`` (fp32 master weights and moments, fused AdamW), ``"adamw_master"``
            (:class:`~fm9g.training.optimizers.AdamWMaster`: the same numerics, the model training
            bf16 compute weights and gradients while the optimizer holds the fp32 masters) or ``"adamw_bf16"``
            (:class:`~fm9g.training.optimizers.AdamWBF16`: under bf16 the trained weights, their
            gradients and the moments are bf16, 8 bytes per parameter instead of 16; under fp32
            the same numerics on fp32 tensors).
        seed: seeds ``adamw_bf16``'s rounding noise.
        cuda_graphs: replay the compiled layers as CUDA graphs (``torch.compile`` mode
            ``"reduce-overhead"``): one launch per layer and direction instead of dozens of kernel
            launches from Python, with the packing layout padded to a few shapes
            (:func:`fm9g.models.fm9g.static_layout`). ``"auto"``: on for compiled layers on CUDA
            without activation checkpointing.
    """

    name = "torch"
    optimizer_name = "adamw"  # FSDPEngine keeps this; TorchEngine sets it from its argument
    flat_norm = True  # the gradient norm over the optimizer's flat buffers when it has them
    cuda_graphs = False  # set in __init__ (FSDPEngine: never)
    _micro_batches = 1  # of the last step: how zero_grad() clears a flat-buffer optimizer
    # Whether train_step takes ``after=`` / ``lr_if_skipped=`` (the Trainer queues the next step
    # before reading this one's figures). Set in __init__: CUDA with an optimizer that reads its
    # learning rate from the device. Set it False to have every step wait for the one before.
    launch_ahead = False
    _device_lr = False  # the learning rate goes to the device as a tensor every step
    _supports_launch_ahead = True  # FSDPEngine: False
    rank = 0
    world_size = 1

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        clip_grad: float = 1.0,
        device: str = "auto",
        precision: str = "auto",
        lr_scale_width: float = 1.0,
        use_checkpoint: bool | None = None,
        compile: bool | str = False,
        lora_only: bool = False,
        peak_flops: float | None = None,
        optimizer: str = "adamw",
        seed: int = 0,
        cuda_graphs: bool | str = False,
    ) -> None:
        self.device = _resolve_device(device)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        self.optimizer_name = optimizer
        self._seed = seed
        _set_dtypes(model, precision, optimizer)  # before the move: a 7B goes to the GPU in bf16, never in fp32
        self.model = model.to(self.device)
        self.clip_grad = clip_grad
        self.lora_only = lora_only
        self._peak = peak_flops
        if use_checkpoint is not None and hasattr(model, "set_activation_checkpointing"):
            model.set_activation_checkpointing(bool(use_checkpoint))
        if compile == "auto":
            compile = self.device.type == "cuda"
        self.cuda_graphs = _resolve_cuda_graphs(cuda_graphs, self.device, bool(compile), model)
        if compile:
            self._compile_layers()
        self._setup_optimizer(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lr_scale_width=lr_scale_width)
        # The learning rate lives on the device for every step of such a run, queued ahead or not,
        # so both paths compute with the same fp32 value.
        self._device_lr = self.device.type == "cuda" and self._skip_on_device
        self.launch_ahead = self._device_lr and self._supports_launch_ahead

    # ------------------------------------------------------------------ helpers
    def _setup_optimizer(self, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                         lr_scale_width: float, fused: bool = True) -> None:
        """muP parameter groups and AdamW (fused where the device has the kernel, when `fused`)."""
        self.groups = param_groups(self.model, lr_scale_width)
        if not self.groups:
            raise ValueError("the model has no trainable parameters")
        self.params = [p for g in self.groups for p in g["params"]]
        opt_groups = [{"params": g["params"], "lr": lr * g["lr_scale"], "lr_scale": g["lr_scale"]} for g in self.groups]
        kw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        if self.optimizer_name == "adamw_bf16":
            self.optimizer = AdamWBF16(opt_groups, seed=self._seed, **kw)
            self._skip_on_device = True  # it reads grad_scale / found_inf as the fused kernel does
            return
        if self.optimizer_name == "adamw_master":
            compute = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self.optimizer = AdamWMaster(opt_groups, compute_dtype=compute, **kw)
            self._skip_on_device = True
            return
        try:  # fused AdamW: one kernel per step on CUDA, and about 2x the single-tensor speed on CPU
            if not fused:
                raise ValueError("not fused")
            self.optimizer = torch.optim.AdamW(opt_groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # a device / dtype without a fused kernel
            self.optimizer = torch.optim.AdamW(opt_groups, foreach=False, **kw)
        # clip + skip inside the fused kernel (no host sync); otherwise the update reads the flag
        self._skip_on_device = bool(self.optimizer.defaults.get("fused"))

    def _compile_layers(self) -> None:
        layers = getattr(getattr(self.model, "encoder", None), "layers", None)
        if layers is None:
            self.model.compile()
            return
        # CUDA graphs: each layer's forward and backward are recorded once per packing shape and
        # replayed with one launch (the model pads its layout to a few shapes, static_layout)
        kw = {"mode": "reduce-overhead"} if self.cuda_graphs else {}
        if self.cuda_graphs:
            self.model.graphed_layers = True
        for layer in layers:
            layer.compile(**kw)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return stage_batch(batch, self.device)

    # ------------------------------------------------------------------ hooks (FSDPEngine overrides them)
    def _step_counts(self, micro_batches: list[dict[str, Any]]) -> tuple[int, int] | torch.Tensor:
        """Labelled and real tokens of the step over all ranks: host ints when every batch carries
        them (the packer's ``num_label_tokens`` / ``num_tokens``), else a float64 device tensor [2]."""
        n_label: list[Any] = []
        n_tokens: list[Any] = []
        for b in micro_batches:
            lab = b.get("num_label_tokens")
            n_label.append(lab if lab is not None else (b["labels"] != -100).sum())
            tok = b.get("num_tokens")
            n_tokens.append(tok if tok is not None else b["input_ids"].numel())
        values = n_label + n_tokens
        if all(not isinstance(v, torch.Tensor) or v.device.type == "cpu" for v in values):
            return sum(int(v) for v in n_label), sum(int(v) for v in n_tokens)
        dev = [torch.as_tensor(v, dtype=torch.float64).to(self.device, non_blocking=True) for v in values]
        k = len(micro_batches)
        return torch.stack([torch.stack(dev[:k]).sum(), torch.stack(dev[k:]).sum()])

    def _before_micro_batch(self, batch: dict[str, Any], last: bool) -> None:
        """Called before each micro-batch's forward (FSDP: gradient sync on the last only)."""

    def _sum_across_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a device tensor over the ranks (one process: itself)."""
        return t

    def _global_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The global gradient norm from this rank's (FSDP: the shards' norm all-reduced)."""
        return norm

    def _update(self, grads: list[torch.Tensor], clip_coef: torch.Tensor | None, finite: torch.Tensor) -> None:
        """The AdamW step: gradients divided by ``clip_coef``; nothing changes unless ``finite``.

        With fused AdamW both happen inside the kernel (``grad_scale`` / ``found_inf``), without a
        host sync; otherwise the flag is read here and the gradients are divided in place.
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
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            torch._foreach_div_(local, clip_coef.to(local[0].device))
        self.optimizer.step()

    # ------------------------------------------------------------------ the step
    def _step_lr(self, lr: float, after: StepOutput | None, lr_if_skipped: float | None) -> float | torch.Tensor:
        """The peak learning rate of this step: a float, or an fp32 device tensor on a CUDA run
        (``lr`` if the queued step ``after`` updates the weights, else ``lr_if_skipped``)."""
        if after is None or lr_if_skipped is None:
            return _to_device(torch.tensor(lr, dtype=torch.float32), self.device) if self._device_lr else lr
        if after.ready or getattr(after, "device_finite", None) is None:  # known on the host (an OOM skip)
            chosen = lr if not after.skipped else lr_if_skipped
            return self._step_lr(chosen, None, None)
        if not self._device_lr:
            raise RuntimeError("this engine reads the learning rate on the host; it cannot queue a step ahead")
        pair = _to_device(torch.tensor([lr, lr_if_skipped], dtype=torch.float32), self.device)
        return torch.where(after.device_finite, pair[0], pair[1])

    def train_step(self, micro_batches: list[dict[str, Any]], lr: float, *, after: StepOutput | None = None,
                   lr_if_skipped: float | None = None) -> StepOutput:
        """One optimizer step over ``micro_batches`` (packed batch dicts, see fm9g.data.packing).

        Each batch needs ``input_ids`` and ``labels`` [B, T]; optional ``position_ids`` [B, T],
        ``cu_seqlens`` [n+1], ``task_ids`` [B, T] (with ``task_names``), ``max_seqlen``,
        ``num_tokens``, ``num_label_tokens``. The returned figures are deferred (read on first use).

        ``after`` / ``lr_if_skipped`` (only when :attr:`launch_ahead`): this step is queued behind
        the step ``after``, whose figures are not read yet; it trains with ``lr`` if ``after``
        updates the weights and with ``lr_if_skipped`` if ``after`` is skipped, chosen on the device.
        """
        step_lr = self._step_lr(lr, after, lr_if_skipped)
        self._micro_batches = len(micro_batches)
        counts = self._step_counts(micro_batches)
        if isinstance(counts, torch.Tensor):
            denom: float | torch.Tensor = counts[0].clamp(min=1).float()
        else:
            denom = float(max(counts[0], 1))
        n_tasks = _n_tasks(micro_batches)
        sums = torch.zeros(1 + 3 * n_tasks, device=self.device, dtype=torch.float64)  # loss, then per task
        if not self.model.training:  # train() walks every module (~1 ms a step for a 24-layer model)
            self.model.train()
        if self.cuda_graphs and len(micro_batches) > 1:
            self._grads_outside_graphs()
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            self._before_micro_batch(batch, i == last)
            b = self._to_device(batch)
            if self.cuda_graphs:  # the graphs' outputs of the last forward/backward are consumed
                torch.compiler.cudagraph_mark_step_begin()
            with self._autocast():
                out = self.model(
                    b["input_ids"], position_ids=b.get("position_ids"), cu_seqlens=b.get("cu_seqlens"),
                    max_seqlen=_max_seqlen(b), labels=b["labels"],
                )
            s = out.token_loss.float().sum()
            (s / denom).backward()
            sums[0] += s.detach()
            if n_tasks and b.get("task_ids") is not None:
                sums[1:] += _task_sums(out.token_loss.detach(), b["labels"], b["task_ids"], n_tasks).reshape(-1)
        sums = self._sum_across_ranks(sums)
        cuda = self.device.type == "cuda"
        if self.flat_norm and hasattr(self.optimizer, "flat_grads"):
            # flat-buffer optimizers (which clip inside their step): one reduction per whole buffer,
            # not a multi-tensor pass over 200+ gradients
            grads = []
            norm = self._global_norm(_total_norm(self.optimizer.flat_grads(), foreach=False))
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = self._global_norm(_total_norm(grads, foreach=cuda))  # pre-clip global L2
        norm = norm.float().reshape(())
        finite = torch.isfinite(sums[0]) & torch.isfinite(norm)
        clip_coef = None
        if self.clip_grad and self.clip_grad > 0:  # grads are divided by this (1 when within the bound)
            clip_coef = torch.where(norm > self.clip_grad, (norm + 1e-6) / self.clip_grad, torch.ones_like(norm))
        for g in self.optimizer.param_groups:
            g["lr"] = step_lr * g["lr_scale"]
        self._update(grads, clip_coef, finite)
        for g in self.optimizer.param_groups:  # a float again in state dicts (the kernels hold the tensor)
            g["lr"] = lr * g["lr_scale"]
        self.zero_grad()
        count_vec = counts if isinstance(counts, torch.Tensor) else torch.zeros(2, device=self.device,
                                                                                dtype=torch.float64)
        figures = torch.cat([sums[:1], count_vec.double(), norm.double().reshape(1), finite.double().reshape(1),
                             sums[1:]])
        return deferred_step_output(figures, n_tasks, counts=None if isinstance(counts, torch.Tensor) else counts)

    def zero_grad(self) -> None:
        # Gradients are zeroed in place (backward adds onto them) after a step of several
        # micro-batches: a flat-buffer optimizer then holds no second set, and with CUDA graphs
        # no gradient lives in the graphs' memory. adamw_bf16 always keeps them (memory first);
        # otherwise they are dropped (adamw_master copies the next ones in at the step: one copy
        # instead of a fill and an add).
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

    # ------------------------------------------------------------------ one process: trivial collectives
    @property
    def is_main(self) -> bool:
        """Always True: the one process logs and writes every file."""
        return True

    def barrier(self) -> None:
        """Nothing to wait for in one process."""

    def all_reduce(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        """The values themselves (one process)."""
        return dict(values)

    # ------------------------------------------------------------------ state
    def model_state_dict(self, *, lora_only: bool = False) -> dict[str, torch.Tensor]:
        if lora_only:
            from fm9g.models.lora import lora_state_dict

            sd = lora_state_dict(self.model)
        else:
            sd = self.model.state_dict()
        if isinstance(self.optimizer, AdamWMaster):  # the fp32 masters, not the bf16 compute weights
            masters = self.optimizer.master_state(self.model.named_parameters(remove_duplicate=False))
            sd.update({k: v for k, v in masters.items() if k in sd})
        return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor], *, lora_only: bool = False) -> None:
        if lora_only:
            from fm9g.models.lora import load_lora_state_dict

            load_lora_state_dict(self.model, state)
        else:
            load_state_dict_checked(self.model, state)
        if isinstance(self.optimizer, AdamWMaster):  # the masters at full precision
            self.optimizer.load_master(self.model.named_parameters(), state)

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        check_optimizer_state(state, self.optimizer)
        self.optimizer.load_state_dict(state)

    def memory_stats(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        return {
            "allocated": torch.cuda.memory_allocated(self.device) / 2**30,
            "peak": torch.cuda.max_memory_allocated(self.device) / 2**30,
        }

    def peak_flops(self) -> float | None:
        if self._peak:
            return self._peak
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        for key, value in _PEAKS:
            if key in name:
                return value
        return None
