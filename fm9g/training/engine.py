"""Engines: what runs forward, backward and the optimizer step for the Trainer.

The Trainer owns the loop (data, schedule, logging, checkpoints); an :class:`Engine` owns the
model on its device(s) and the optimizer. Two engines plug into the same small interface:

- ``torch`` (:class:`TorchEngine`, here): one process on CPU or one GPU. fp32 master weights,
  fused AdamW; on CUDA bf16 autocast.
- ``bmtrain`` (later): ZeRO-3 blocks, optimizer offload, multi-node; never imported elsewhere.

The loss of one optimizer step is the mean over ALL labelled tokens of its ``grad_accum``
micro-batches: every micro-batch backpropagates ``sum(token_loss) / N`` where N is the number of
labelled tokens (labels != -100) in the whole step, so accumulation is exact (a step of two
micro-batches equals one step over the concatenated batch).
"""
from __future__ import annotations

import abc
import contextlib
import inspect
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["Engine", "StepOutput", "TorchEngine", "param_groups", "build_engine"]

_NO_LR_SCALE = ("layernorm", "embedding", "lm_head")


@dataclass(kw_only=True)
class StepOutput:
    """What one optimizer step reports.

    Attributes:
        loss: mean loss over the labelled tokens of the step (float; nan/inf when skipped for it).
        num_label_tokens: labelled tokens in the step.
        num_tokens: real (non-padding) tokens in the step.
        grad_norm: global L2 norm of the gradient before clipping (None when skipped).
        skipped: None, ``"nonfinite"`` (loss or gradient not finite: no update) or ``"oom"``.
        task_loss_sum / task_label_tokens: per task id, summed token loss and labelled tokens.
        task_tokens: per task id, real tokens.
    """

    loss: float
    num_label_tokens: int
    num_tokens: int
    grad_norm: float | None = None
    skipped: str | None = None
    task_loss_sum: dict[int, float] = field(default_factory=dict)
    task_label_tokens: dict[int, int] = field(default_factory=dict)
    task_tokens: dict[int, int] = field(default_factory=dict)


class Engine(abc.ABC):
    """The interface the Trainer drives. Implementations: :class:`TorchEngine` (``bmtrain`` later).

    Attributes:
        model: the (wrapped) model; its ``state_dict()`` keys are the original FM9G names.
        device: where batches go.
        rank / world_size: data-parallel position (0 / 1 for single-process engines).
    """

    name: str = "abstract"
    model: nn.Module
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes shared files."""
        return self.rank == 0

    @abc.abstractmethod
    def train_step(self, micro_batches: list[dict[str, Any]], lr: float) -> StepOutput:
        """Forward + backward every micro-batch, clip, and (if finite) update with peak lr ``lr``
        (each parameter group scales it by its ``lr_scale``)."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Drop all gradients (after a skipped step)."""

    @abc.abstractmethod
    def model_state_dict(self, *, lora_only: bool = False) -> dict[str, torch.Tensor]:
        """Full state dict (original names) or only the LoRA tensors, on CPU."""

    @abc.abstractmethod
    def load_model_state_dict(self, state: dict[str, torch.Tensor], *, lora_only: bool = False) -> None:
        """Load what :meth:`model_state_dict` returned (strict)."""

    @abc.abstractmethod
    def optimizer_state_dict(self) -> dict[str, Any]:
        """Optimizer state (moments, step counts, groups)."""

    @abc.abstractmethod
    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state_dict`."""

    def memory_stats(self) -> dict[str, float]:
        """Device memory in GiB: ``allocated``, ``peak`` (empty on CPU)."""
        return {}

    def peak_flops(self) -> float | None:
        """Dense bf16 peak FLOP/s of the device (for MFU), or None if unknown."""
        return None


def param_groups(model: nn.Module, lr_scale_width: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups with muP learning-rate scaling (SPEC §4.2).

    Every trainable parameter whose name ends with ``.weight`` and does not contain
    ``layernorm``, ``embedding`` or ``lm_head`` gets ``lr_scale = 1 / lr_scale_width``; all others
    (norms, embeddings, lm_head, biases, LoRA ``lora_A``/``lora_B``) get ``lr_scale = 1``.

    Args:
        model: the model (names as in ``named_parameters()``).
        lr_scale_width: ``config.scale_width`` (``dim_model / dim_model_base`` when ``scale``, else 1).
    Returns:
        One or two groups ``{"params", "names", "lr_scale"}`` (empty groups omitted).
    """
    scaled: list[tuple[str, nn.Parameter]] = []
    plain: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if lr_scale_width != 1.0 and name.endswith(".weight") and not any(s in name for s in _NO_LR_SCALE):
            scaled.append((name, p))
        else:
            plain.append((name, p))
    groups = []
    for items, scale in ((plain, 1.0), (scaled, 1.0 / lr_scale_width)):
        if items:
            groups.append({"params": [p for _, p in items], "names": [n for n, _ in items], "lr_scale": scale})
    return groups


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec!r} but CUDA is not available; use device='cpu' or 'auto'")
    return dev


_PEAKS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
          ("L40S", 362e12), ("4090", 165e12))


class TorchEngine(Engine):
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
            ``"auto"``: on CUDA only (1.3-1.4x the eager step on an H100, see benchmarks/RESULTS.md).
        lora_only: only LoRA tensors are trained/saved.
    """

    name = "torch"

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
        try:
            self._takes_max_seqlen = "max_seqlen" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            self._takes_max_seqlen = False
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
            extra = {"max_seqlen": int(b["max_seqlen"])} if self._takes_max_seqlen and b.get("max_seqlen") else {}
            with self._autocast():
                out = self.model(
                    b["input_ids"], position_ids=b.get("position_ids"), cu_seqlens=b.get("cu_seqlens"),
                    labels=b["labels"], **extra,
                )
            token_loss = getattr(out, "token_loss", None)
            if token_loss is not None:
                s = token_loss.float().sum()
            else:  # a user model that only returns the mean
                s = out.loss.float() * getattr(out, "num_label_tokens", _num_label_tokens(batch))
            (s / denom).backward()
            loss_sum += s.detach()
            if token_loss is not None and b.get("task_ids") is not None:
                n_tasks = len(b["task_names"]) if b.get("task_names") else None
                task_sums.append(_task_sums(token_loss.detach(), b["labels"], b["task_ids"], n_tasks))
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


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """``model.load_state_dict(state, strict=True)`` with errors naming the keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(state[k].shape)} in {source} vs {tuple(own[k].shape)} in the model"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
        if missing:
            parts.append(f"missing keys: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        raise ValueError(
            f"the {source} does not fit the model ({'; '.join(parts)}); check that the model config "
            "(dims, layers, vocab, tie_lm_head, qkv_bias) is the one the weights were trained with"
        )
    model.load_state_dict(state, strict=True)


def _num_label_tokens(batch: dict[str, Any]) -> int:
    n = batch.get("num_label_tokens")
    if n is None:
        return int((batch["labels"] != -100).sum())
    return int(n)


def _num_tokens(batch: dict[str, Any]) -> int:
    n = batch.get("num_tokens")
    if n is None:
        return int(batch["input_ids"].numel())
    return int(n)


def _task_sums(token_loss: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
               n_tasks: int | None = None) -> torch.Tensor:
    """[K, 3] per task id: summed loss, labelled tokens, real tokens (computed on the device;
    K = n_tasks when known, which avoids a device sync)."""
    ids = task_ids.reshape(-1).long()
    if n_tasks is not None:
        k = n_tasks
        ids = torch.where(ids < k, ids, torch.full_like(ids, -1))
    else:
        k = int(ids.max().item()) + 1 if ids.numel() else 0
    out = torch.zeros(max(k, 0) + 1, 3, device=token_loss.device, dtype=torch.float64)
    if k <= 0:
        return out[:0]
    real = ids >= 0
    slot = torch.where(real, ids, torch.full_like(ids, k))
    lab = (labels.reshape(-1) != -100) & real
    out[:, 0].index_add_(0, slot, (token_loss.reshape(-1).double() * lab))
    out[:, 1].index_add_(0, slot, lab.double())
    out[:, 2].index_add_(0, slot, real.double())
    return out[:k]


def _merge_task_sums(parts: Iterable[torch.Tensor]) -> tuple[dict[int, float], dict[int, int], dict[int, int]]:
    loss: dict[int, float] = {}
    lab: dict[int, int] = {}
    tok: dict[int, int] = {}
    for t in parts:
        for i, (s, n, r) in enumerate(t.cpu().tolist()):
            if r == 0:
                continue
            loss[i] = loss.get(i, 0.0) + s
            lab[i] = lab.get(i, 0) + int(n)
            tok[i] = tok.get(i, 0) + int(r)
    return loss, lab, tok


def build_engine(config: Any, model: nn.Module | None, *, lora_only: bool = False) -> Engine:
    """The engine named by ``config.engine`` for ``model`` (a built, weight-loaded model; under
    torchrun also None: the FSDP2 engine then builds it on the meta device, see docs/distributed.md)."""
    if config.engine == "torch":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # torchrun: FSDP2 across the processes (model None: built on meta, see fsdp_engine)
            from fm9g.training.fsdp_engine import FSDPEngine

            return FSDPEngine(config, model, lora_only=lora_only)  # type: ignore[return-value]
        if config.offload:
            warnings.warn("offload=true is only used by engine='bmtrain'; the torch engine keeps the optimizer on the device",
                          stacklevel=2)
        scale_width = 1.0
        mc = getattr(model, "config", None)
        if mc is not None and getattr(mc, "scale", False):
            scale_width = float(getattr(mc, "scale_width", 1.0))
        return TorchEngine(
            model, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas), eps=config.adam_eps,
            clip_grad=config.clip_grad, device=config.device, precision=config.precision, lr_scale_width=scale_width,
            use_checkpoint=config.use_checkpoint, compile=config.compile, lora_only=lora_only,
            peak_flops=config.peak_flops,
        )
    if config.engine == "bmtrain":
        try:
            from fm9g.training.bmtrain_engine import BMTrainEngine  # type: ignore[import-not-found]
        except ImportError as err:
            raise RuntimeError(
                "engine='bmtrain' is not available in this version (or bmtrain is not installed: "
                "pip install 'fm9g[bmtrain]'); use engine='torch'"
            ) from err
        return BMTrainEngine(config, model, lora_only=lora_only)
    raise ValueError(f"engine={config.engine!r}: expected 'torch' or 'bmtrain'")
