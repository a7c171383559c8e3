"""The arithmetic every engine's step shares: one home for each piece.

- token counts of a step (:func:`num_label_tokens`, :func:`num_tokens`) and the per-task sums
  (:func:`task_sums`, :func:`merge_task_sums`, :func:`n_tasks`);
- the gradient norm accumulated in fp32 (:func:`total_norm`) and the clip coefficient every
  gradient is divided by (:func:`clip_coefficient`);
- the muP optimizer groups (:func:`param_groups`) and the check that a saved optimizer state fits
  them (:func:`check_optimizer_state`);
- a device's dense bf16 peak FLOP/s for MFU (:func:`peak_flops_of`);
- moving a batch to the device without blocking the host (:func:`stage_batch`).

The loss of one optimizer step is the mean over ALL labelled tokens of its ``grad_accum``
micro-batches across all ranks: every micro-batch backpropagates ``sum(token_loss) / N`` with N
the labelled tokens (labels != -100) of the whole step, so accumulation is exact.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["PEAK_FLOPS", "peak_flops_of", "num_label_tokens", "num_tokens", "task_sums", "merge_task_sums",
           "n_tasks", "stage_batch", "max_seqlen", "total_norm", "clip_coefficient", "param_groups",
           "lr_scale_width", "check_optimizer_state"]

# dense bf16 peak FLOP/s by a substring of the GPU's name (MFU divides by it)
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("A100", 312e12),
              ("A800", 312e12), ("L40S", 362e12), ("4090", 165e12))

_NO_LR_SCALE = ("layernorm", "embedding", "lm_head")


def peak_flops_of(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA ``device`` from its name, None when unknown (or not CUDA)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_FLOPS if key in name), None)


def num_label_tokens(batch: dict[str, Any]) -> int:
    """Labelled tokens of a batch (the packer's ``num_label_tokens``, else counted)."""
    n = batch.get("num_label_tokens")
    return int((batch["labels"] != -100).sum()) if n is None else int(n)


def num_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens of a batch (the packer's ``num_tokens``, else every slot)."""
    n = batch.get("num_tokens")
    return int(batch["input_ids"].numel()) if n is None else int(n)


def task_sums(token_loss: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
              n: int | None = None) -> torch.Tensor:
    """[K, 3] float64 per task id: summed loss, labelled tokens, real tokens (on the device;
    K = ``n`` when known, which avoids a device sync). Task id -1 marks padding."""
    ids = task_ids.reshape(-1).long()
    if n is not None:
        k = n
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


def merge_task_sums(parts: Iterable[torch.Tensor]) -> tuple[dict[int, float], dict[int, int], dict[int, int]]:
    """Per-task (loss sum, labelled tokens, real tokens) dicts from several :func:`task_sums`."""
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


def n_tasks(micro_batches: list[dict[str, Any]]) -> int:
    """Task slots of a step's per-task sums: ``len(task_names)``, else the largest task id + 1
    (read from the host copy of ``task_ids``), 0 when no batch has ``task_ids``."""
    if not any(b.get("task_ids") is not None for b in micro_batches):
        return 0
    names = next((b["task_names"] for b in micro_batches if b.get("task_names")), None)
    if names:
        return len(names)
    return max((int(b["task_ids"].max()) + 1 for b in micro_batches if b.get("task_ids") is not None
                and b["task_ids"].numel()), default=0)


def stage_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with its tensors on ``device``, copied without blocking the host.

    On CUDA a CPU tensor is pinned first and copied ``non_blocking`` (the copy queues behind the
    work already on the stream, so a batch can be staged while the previous step still runs);
    tensors already on the device are kept as they are.
    """
    cuda = device.type == "cuda"
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.device.type != device.type:
            if cuda and v.device.type == "cpu" and not v.is_pinned():
                v = v.pin_memory()
            v = v.to(device, non_blocking=cuda)
        out[k] = v
    return out


def max_seqlen(batch: dict[str, Any]) -> int | None:
    """The batch's longest document as a Python int (the packer gives one), or None (the model
    then derives it); a tensor value is only read when it lives on the host."""
    m = batch.get("max_seqlen")
    if m is None:
        return None
    if isinstance(m, torch.Tensor):
        return int(m) if m.device.type == "cpu" else None
    return int(m) or None


def total_norm(grads: list[torch.Tensor], *, foreach: bool) -> torch.Tensor:
    """The L2 norm of all ``grads`` together (0-d fp32), accumulated in fp32 also for bf16
    gradients (whose own norm would come back rounded to bf16's 8 bits: 62.0, 64.0, 63.5)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, 2.0, foreach=foreach).float().reshape(())
    if foreach:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    else:
        norms = [torch.linalg.vector_norm(g, 2.0, dtype=torch.float32) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def clip_coefficient(norm: torch.Tensor, clip_grad: float) -> torch.Tensor | None:
    """What every gradient is divided by: ``(norm + 1e-6) / clip_grad`` above the bound, else 1
    (a device tensor; no host sync). None when clipping is off (``clip_grad <= 0``)."""
    if not clip_grad or clip_grad <= 0:
        return None
    return torch.where(norm > clip_grad, (norm + 1e-6) / clip_grad, torch.ones_like(norm))


def lr_scale_width(model: nn.Module) -> float:
    """The muP width ratio of ``model``: its config's ``scale_width`` (``FM9GConfig`` owns the rule:
    ``dim_model / dim_model_base`` when ``scale``, else 1); 1 for a model without one."""
    return float(getattr(getattr(model, "config", None), "scale_width", 1.0))


def param_groups(model: nn.Module, width: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups with muP learning-rate scaling (docs/training.md, "muP").

    Every trainable parameter whose name ends with ``.weight`` and does not contain
    ``layernorm``, ``embedding`` or ``lm_head`` gets ``lr_scale = 1 / width``; all others (norms,
    embeddings, lm_head, biases, LoRA ``lora_A``/``lora_B``) get ``lr_scale = 1``.

    Args:
        model: the model (names as in ``named_parameters()``).
        width: the muP width ratio (:func:`lr_scale_width`).
    Returns:
        One or two groups ``{"params", "names", "lr_scale"}`` (empty groups omitted).
    """
    scaled: list[tuple[str, nn.Parameter]] = []
    plain: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if width != 1.0 and name.endswith(".weight") and not any(s in name for s in _NO_LR_SCALE):
            scaled.append((name, p))
        else:
            plain.append((name, p))
    groups = []
    for items, scale in ((plain, 1.0), (scaled, 1.0 / width)):
        if items:
            groups.append({"params": [p for _, p in items], "names": [n for n, _ in items], "lr_scale": scale})
    return groups


def check_optimizer_state(state: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Refuse an optimizer state whose groups do not match ``groups`` (an optimizer's
    ``param_groups``: another model or LoRA setting), naming the sizes and the option that skips it."""
    saved = state.get("param_groups", [])
    if len(saved) != len(groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved, groups)):
        raise ValueError(
            "the optimizer state in the checkpoint does not match this model's trainable parameters "
            f"({[len(g['params']) for g in saved]} vs {[len(g['params']) for g in groups]} per group); "
            "was it saved by a run with another model or LoRA setting? Use only_load_model=true to skip it"
        )
