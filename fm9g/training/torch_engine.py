"""`TorchEngine`: the one-process engine (CPU or one GPU) behind the :class:`~fm9g.training.engine.Engine` protocol.

fp32 master weights and fused AdamW; on CUDA bf16 autocast. Clipping on CUDA is folded into the
fused AdamW kernel (it divides each gradient as it reads it). In one process every figure of a
step is already global, ``barrier`` is a no-op and ``all_reduce`` the identity.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from fm9g.training.checkpoint import load_state_dict_checked
from fm9g.training.engine import (
    _PEAKS,
    StepOutput,
    _merge_task_sums,
    _num_label_tokens,
    _num_tokens,
    _task_sums,
    param_groups,
)

__all__ = ["TorchEngine"]


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec!r} but CUDA is not available; use device='cpu' or 'auto'")
    return dev


class TorchEngine:
    """Single-process engine: CPU or one GPU.

    Args:
        model: the built model (fp32 parameters; moved to the device here).
        lr: peak learning rate (each step passes the scheduled one).
        weight_decay, betas, eps: AdamW settings (decoupled weight decay on every parameter, as
            the original).
        clip_grad: max global L2 norm (<= 0: no clipping; the norm is still computed).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU) | ``"bf16"`` | ``"fp32"``.
        lr_scale_width: muP width ratio (1 = no muP learning-rate groups).
        use_checkpoint: activation checkpointing on/off (None leaves the model's setting).
        compile: ``torch.compile`` each transformer layer (``model.encoder.layers``) in place;
            ``"auto"``: on CUDA only (1.3-1.4x the eager step on an H100, see benchmarks/RESULTS.md in the repository).
        lora_only: only LoRA tensors are trained/saved.
    """

    name = "torch"
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
    ) -> None:
        self.device = _resolve_device(device)
        self.model = model.to(self.device)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        if precision == "fp32":
            self.model.float()
        else:  # fp32 master weights for what trains; frozen (LoRA base) weights may stay bf16
            for p in self.model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        self.clip_grad = clip_grad
        self.lora_only = lora_only
        self._peak = peak_flops
        if use_checkpoint is not None and hasattr(model, "set_activation_checkpointing"):
            model.set_activation_checkpointing(bool(use_checkpoint))
        if compile == "auto":
            compile = self.device.type == "cuda"
        if compile:
            self._compile_layers()
        self.groups = param_groups(self.model, lr_scale_width)
        if not self.groups:
            raise ValueError("the model has no trainable parameters")
        self.params = [p for g in self.groups for p in g["params"]]
        opt_groups = [{"params": g["params"], "lr": lr * g["lr_scale"], "lr_scale": g["lr_scale"]} for g in self.groups]
        try:  # fused AdamW: one kernel per step on CUDA, and about 2x the single-tensor speed on CPU
            self.optimizer = torch.optim.AdamW(opt_groups, lr=lr, betas=tuple(betas), eps=eps,
                                               weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # a device / dtype without a fused kernel
            self.optimizer = torch.optim.AdamW(opt_groups, lr=lr, betas=tuple(betas), eps=eps,
                                               weight_decay=weight_decay, foreach=False)

    # ------------------------------------------------------------------ helpers
    def _compile_layers(self) -> None:
        layers = getattr(getattr(self.model, "encoder", None), "layers", None)
        if layers is None:
            self.model.compile()
            return
        for layer in layers:
            layer.compile()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        nb = self.device.type == "cuda"
        return {k: (v.to(self.device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ the step
    def train_step(self, micro_batches: list[dict[str, Any]], lr: float) -> StepOutput:
        """One optimizer step over ``micro_batches`` (packed batch dicts, see fm9g.data.packing).

        Each batch needs ``input_ids`` and ``labels`` [B, T]; optional ``position_ids`` [B, T],
        ``cu_seqlens`` [n+1], ``task_ids`` [B, T], ``num_tokens``, ``num_label_tokens``.
        """
        n_label = sum(_num_label_tokens(b) for b in micro_batches)
        n_tokens = sum(_num_tokens(b) for b in micro_batches)
        denom = float(max(n_label, 1))
        self.model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        task_sums: list[torch.Tensor] = []
        for batch in micro_batches:
            b = self._to_device(batch)
            max_seqlen = b.get("max_seqlen")
            with self._autocast():
                out = self.model(
                    b["input_ids"], position_ids=b.get("position_ids"), cu_seqlens=b.get("cu_seqlens"),
                    max_seqlen=int(max_seqlen) if max_seqlen else None, labels=b["labels"],
                )
            s = out.token_loss.float().sum()
            (s / denom).backward()
            loss_sum += s.detach()
            if b.get("task_ids") is not None:
                n_tasks = len(b["task_names"]) if b.get("task_names") else None
                task_sums.append(_task_sums(out.token_loss.detach(), b["labels"], b["task_ids"], n_tasks))
        loss = float(loss_sum.item()) / denom
        task_loss, task_lab, task_tok = _merge_task_sums(task_sums)
        result = StepOutput(loss=loss, num_label_tokens=n_label, num_tokens=n_tokens,
                            task_loss_sum=task_loss, task_label_tokens=task_lab, task_tokens=task_tok)
        if not math.isfinite(loss):
            self.zero_grad()
            result.skipped = "nonfinite"
            return result
        grads = [p.grad for p in self.params if p.grad is not None]
        cuda = self.device.type == "cuda"
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=cuda)  # pre-clip global L2 norm
        grad_norm = float(norm)
        result.grad_norm = grad_norm
        if not math.isfinite(grad_norm):
            self.zero_grad()
            result.skipped = "nonfinite"
            return result
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        if self.clip_grad and self.clip_grad > 0 and grad_norm > self.clip_grad:
            inv_coef = (norm.float() + 1e-6) / self.clip_grad  # grads are divided by this
            if cuda and self.optimizer.defaults.get("fused"):
                # The fused CUDA AdamW kernel divides each gradient by `grad_scale` as it reads it:
                # clipping costs no extra pass over the gradients.
                self.optimizer.grad_scale = inv_coef.to(self.device)
            else:
                torch._foreach_div_(grads, inv_coef.to(grads[0].device))
        try:
            self.optimizer.step()
        finally:
            self.optimizer.grad_scale = None
        self.zero_grad()
        return result

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

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
        return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor], *, lora_only: bool = False) -> None:
        if lora_only:
            from fm9g.models.lora import load_lora_state_dict

            load_lora_state_dict(self.model, state)
            return
        load_state_dict_checked(self.model, state)

    def optimizer_state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        groups = state.get("param_groups", [])
        mine = self.optimizer.param_groups
        if len(groups) != len(mine) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, mine)):
            raise ValueError(
                "the optimizer state in the checkpoint does not match this model's trainable parameters "
                f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in mine]} per group); "
                "was it saved by a run with another model or LoRA setting? Use only_load_model=true to skip it"
            )
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
