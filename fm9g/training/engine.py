"""Engines: what runs forward, backward and the optimizer step for the Trainer.

The Trainer owns the loop (data, schedule, logging, checkpoints); an :class:`Engine` owns the
model on its device(s) and the optimizer. The Trainer talks to an engine only through the
:class:`Engine` protocol below, so an engine that shards the model over several processes fits
without changes to the Trainer. Engines: ``torch`` — one process on CPU or one GPU
(:class:`~fm9g.training.torch_engine.TorchEngine`), or PyTorch FSDP2 across the processes of a
torchrun launch (:class:`~fm9g.training.fsdp_engine.FSDPEngine`); ``bmtrain`` — ZeRO-3 blocks and
optional optimizer offload (:class:`~fm9g.training.bmtrain_engine.BMTrainEngine`).

The loss of one optimizer step is the mean over ALL labelled tokens of its ``grad_accum``
micro-batches (across all ranks): every micro-batch backpropagates ``sum(token_loss) / N`` where N
is the number of labelled tokens (labels != -100) in the whole step, so accumulation is exact (a
step of two micro-batches equals one step over the concatenated batch).

The model an engine trains follows :class:`TrainableLM`:
``model(input_ids, *, position_ids, cu_seqlens, max_seqlen, labels)`` returns an object with
``.loss``, ``.token_loss`` and ``.logits`` (see :class:`LMOutput`).
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, runtime_checkable

import torch
from torch import nn

from fm9g.training.checkpoint import load_state_dict_checked

if TYPE_CHECKING:
    from fm9g.training.config import TrainConfig
    from fm9g.training.torch_engine import TorchEngine

__all__ = ["Engine", "LMOutput", "StepOutput", "TrainableLM", "TorchEngine", "param_groups", "build_engine",
           "load_state_dict_checked"]

_NO_LR_SCALE = ("layernorm", "embedding", "lm_head")


_STEP_FIELDS = ("loss", "num_label_tokens", "num_tokens", "grad_norm", "skipped", "task_loss_sum",
                "task_label_tokens", "task_tokens")


def _step_field(name: str) -> property:
    def get(self: "StepOutput") -> Any:
        return self.resolve()._values[name]

    def set_(self: "StepOutput", value: Any) -> None:
        self.resolve()._values[name] = value

    return property(get, set_, doc=f"``{name}`` (reading it waits for the step's figures; see :meth:`StepOutput.resolve`).")


class StepOutput:
    """What one optimizer step reports. Every figure is global: summed over all ranks.

    An engine may return the figures *deferred*: they stay on the device while the step runs and
    are copied to the host once, when any of them is first read (or :meth:`resolve` is called).
    That keeps the step free of host synchronisation; the Trainer reads them after it has fetched
    and staged the next batch.

    Attributes:
        loss: mean loss over the labelled tokens of the step (float; nan/inf when skipped for it).
        num_label_tokens: labelled tokens in the step.
        num_tokens: real (non-padding) tokens in the step.
        grad_norm: global L2 norm of the gradient before clipping (None when the loss was not finite).
        skipped: None, ``"nonfinite"`` (loss or gradient not finite: no update) or ``"oom"``;
            the same on every rank.
        task_loss_sum / task_label_tokens: per task id, summed token loss and labelled tokens.
        task_tokens: per task id, real tokens.
    """

    loss = _step_field("loss")
    num_label_tokens = _step_field("num_label_tokens")
    num_tokens = _step_field("num_tokens")
    grad_norm = _step_field("grad_norm")
    skipped = _step_field("skipped")
    task_loss_sum = _step_field("task_loss_sum")
    task_label_tokens = _step_field("task_label_tokens")
    task_tokens = _step_field("task_tokens")

    def __init__(self, *, loss: float = float("nan"), num_label_tokens: int = 0, num_tokens: int = 0,
                 grad_norm: float | None = None, skipped: str | None = None,
                 task_loss_sum: dict[int, float] | None = None, task_label_tokens: dict[int, int] | None = None,
                 task_tokens: dict[int, int] | None = None) -> None:
        self._pending: Callable[[], dict[str, Any]] | None = None
        self._values: dict[str, Any] = dict(
            loss=loss, num_label_tokens=num_label_tokens, num_tokens=num_tokens, grad_norm=grad_norm,
            skipped=skipped, task_loss_sum=dict(task_loss_sum or {}), task_label_tokens=dict(task_label_tokens or {}),
            task_tokens=dict(task_tokens or {}))

    @classmethod
    def deferred(cls, read: Callable[[], dict[str, Any]]) -> "StepOutput":
        """A StepOutput whose figures ``read()`` returns (a dict of the attributes) when first needed."""
        out = cls()
        out._pending = read
        return out

    @property
    def ready(self) -> bool:
        """True once the figures are on the host (reading them costs nothing more)."""
        return self._pending is None

    def resolve(self) -> "StepOutput":
        """Copy the figures to the host (waits for the step to finish on the device); returns self."""
        if self._pending is not None:
            read, self._pending = self._pending, None
            self._values.update(read())
        return self

    def __repr__(self) -> str:
        if not self.ready:
            return "StepOutput(<on the device>)"
        return "StepOutput(" + ", ".join(f"{k}={self._values[k]!r}" for k in _STEP_FIELDS) + ")"


class LMOutput(Protocol):
    """What a :class:`TrainableLM` returns.

    Attributes:
        loss: mean loss over the labelled tokens (a scalar tensor).
        token_loss: [B*T] (or [B, T]) fp32 per-token loss, 0 where ``labels == -100``.
        logits: [B, T, V] or None (a model may skip them when ``labels`` are given).
    """

    loss: torch.Tensor | None
    token_loss: torch.Tensor
    logits: torch.Tensor | None


class TrainableLM(Protocol):
    """The forward contract every engine relies on (:class:`fm9g.models.fm9g.FM9GModel` fulfils it).

    Args of the call: ``input_ids`` [B, T]; ``position_ids`` [B, T] or None; ``cu_seqlens``
    [n+1] int32 document boundaries of the flattened batch or None; ``max_seqlen`` the longest
    document or None; ``labels`` [B, T] (-100 = no loss).
    """

    def __call__(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                 labels: torch.Tensor | None = None) -> LMOutput: ...


@runtime_checkable
class Engine(Protocol):
    """The interface the Trainer drives.

    Attributes:
        name: ``"torch"`` (``"bmtrain"`` for the bmtrain engine).
        model: the (possibly wrapped / sharded) model; its state-dict names are the original FM9G names.
        device: where batches go.
        precision: ``"bf16"`` or ``"fp32"``.
        rank / world_size: data-parallel position (0 / 1 in one process).
    """

    name: str
    model: nn.Module
    device: torch.device
    precision: str
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """``rank == 0``: the only process that prints, writes TensorBoard / stats and shared files."""
        ...

    def train_step(self, micro_batches: list[dict[str, Any]], lr: float) -> StepOutput:
        """Forward + backward every micro-batch, clip, and (if finite) update with peak lr ``lr``
        (each parameter group scales it by its muP ``lr_scale``). The loss is the mean over all
        labelled tokens of the step across all ranks; the returned figures are global.

        An engine whose ``launch_ahead`` attribute is True also takes ``after=`` (a StepOutput
        not read yet) and ``lr_if_skipped=``: the step is queued behind ``after`` and trains with
        ``lr`` if ``after`` updates the weights, else with ``lr_if_skipped``, chosen on the
        device (the Trainer then queues one step ahead; see :meth:`Trainer.fit`)."""
        ...

    def zero_grad(self) -> None:
        """Drop all gradients (after a skipped step)."""
        ...

    def model_state_dict(self, *, lora_only: bool = False) -> dict[str, torch.Tensor]:
        """The full state (original names, CPU tensors) on the main rank, ``{}`` on the others
        (collective: every rank calls it); with ``lora_only`` only the LoRA tensors."""
        ...

    def load_model_state_dict(self, state: dict[str, torch.Tensor], *, lora_only: bool = False) -> None:
        """Load the full state (strict); every rank passes it (it may be a lazily loaded mapping)
        and keeps its shard."""
        ...

    def optimizer_state_dict(self) -> dict[str, Any]:
        """THIS rank's optimizer state (moments, step counts, groups)."""
        ...

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state_dict` of this rank."""
        ...

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process)."""
        ...

    def all_reduce(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        """Reduce metric values across ranks (``op``: ``"sum"``, ``"max"``, ``"min"``); identity in one process."""
        ...

    def memory_stats(self) -> dict[str, float]:
        """Device memory in GiB: ``allocated``, ``peak`` (``{}`` on CPU)."""
        ...

    def peak_flops(self) -> float | None:
        """Dense bf16 peak FLOP/s of one device (for MFU), or None if unknown."""
        ...


def param_groups(model: nn.Module, lr_scale_width: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups with muP learning-rate scaling (docs/training.md, "muP").

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


def lr_scale_width(model: nn.Module) -> float:
    """The muP width ratio of ``model`` (``config.scale_width`` when ``config.scale``, else 1)."""
    mc = getattr(model, "config", None)
    if mc is not None and getattr(mc, "scale", False):
        return float(getattr(mc, "scale_width", 1.0))
    return 1.0


# Shared by every engine's step: dense bf16 peak FLOP/s by GPU name (for MFU), token counts, per-task sums.
_PEAKS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
          ("L40S", 362e12), ("4090", 165e12))


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


def _n_tasks(micro_batches: list[dict[str, Any]]) -> int:
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


def _max_seqlen(batch: dict[str, Any]) -> int | None:
    """The batch's longest document as a Python int (the packer gives one), or None (the model
    then derives it); a tensor value is only read when it lives on the host."""
    m = batch.get("max_seqlen")
    if m is None:
        return None
    if isinstance(m, torch.Tensor):
        return int(m) if m.device.type == "cpu" else None
    return int(m) or None


def deferred_step_output(figures: torch.Tensor, n_tasks: int, *, counts: tuple[int, int] | None = None) -> StepOutput:
    """A :class:`StepOutput` over the device vector ``figures`` (float64:
    ``[loss_sum, n_label, n_tokens, grad_norm, finite, task 0 (loss, labels, tokens), task 1, ...]``).

    On CUDA the copy to pinned host memory is queued at once, behind the step; reading a figure
    waits for that copy only. ``counts``: ``(n_label, n_tokens)`` when the host knows them (their
    slots in ``figures`` are then ignored).
    """
    if figures.device.type == "cuda":
        host = torch.empty(figures.shape, dtype=figures.dtype, pin_memory=True)
        host.copy_(figures, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def fetch() -> list[float]:
            done.synchronize()
            return host.tolist()
    else:
        def fetch() -> list[float]:
            return figures.tolist()

    def read() -> dict[str, Any]:
        vals = fetch()
        loss_sum, n_label, n_tokens, norm, finite = vals[:5]
        if counts is not None:
            n_label, n_tokens = counts
        n_label = int(n_label)
        loss = loss_sum / max(n_label, 1)
        task_loss: dict[int, float] = {}
        task_lab: dict[int, int] = {}
        task_tok: dict[int, int] = {}
        for i in range(n_tasks):
            s, n, r = vals[5 + 3 * i: 8 + 3 * i]
            if r:
                task_loss[i], task_lab[i], task_tok[i] = s, int(n), int(r)
        return dict(loss=loss, num_label_tokens=n_label, num_tokens=int(n_tokens),
                    grad_norm=norm if math.isfinite(loss) else None, skipped=None if finite else "nonfinite",
                    task_loss_sum=task_loss, task_label_tokens=task_lab, task_tokens=task_tok)

    out = StepOutput.deferred(read)
    out.device_finite = figures[4] > 0  # read by a step queued behind this one (launch ahead), never synced
    return out


def check_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer state whose groups do not match `optimizer` (another model or LoRA
    setting), naming the sizes and the option that skips it."""
    groups = state.get("param_groups", [])
    mine = optimizer.param_groups
    if len(groups) != len(mine) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, mine)):
        raise ValueError(
            "the optimizer state in the checkpoint does not match this model's trainable parameters "
            f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in mine]} per group); "
            "was it saved by a run with another model or LoRA setting? Use only_load_model=true to skip it"
        )


def build_engine(config: "TrainConfig", model: nn.Module | None, *, lora_only: bool = False) -> Engine:
    """The engine named by ``config.engine`` for ``model`` (a built, weight-loaded model; under
    torchrun also None: the FSDP2 engine then builds it on the meta device, see docs/distributed.md).

    Args:
        config: the run's TrainConfig (``engine``, optimizer, precision, device, compile, use_checkpoint).
        model: the model to train (follows :class:`TrainableLM`).
        lora_only: only the LoRA tensors train and are saved.
    Raises:
        RuntimeError: ``engine="bmtrain"`` without bmtrain installed (naming the install command).
    """
    if config.optimizer != "adamw" and (config.engine != "torch" or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise ValueError(
            f"optimizer={config.optimizer!r} runs under the one-process torch engine only; with "
            f"engine={config.engine!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE', '1')} use optimizer=\"adamw\" "
            "(bmtrain: offload=true moves its state to the CPU; FSDP2 shards it across the ranks)"
        )
    if config.engine == "bmtrain":
        from fm9g.training.bmtrain_engine import BMTrainEngine  # fails at once without bmtrain, naming the install command

        return BMTrainEngine(config, model, lora_only=lora_only)
    if config.engine != "torch":
        raise ValueError(f"engine={config.engine!r}: expected 'torch' or 'bmtrain'")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: FSDP2 across the processes
        from fm9g.training.fsdp_engine import FSDPEngine

        return FSDPEngine(config, model, lora_only=lora_only)  # model None: built on meta there
    from fm9g.training.torch_engine import TorchEngine

    return TorchEngine(
        model, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas), eps=config.adam_eps,
        clip_grad=config.clip_grad, device=config.device, precision=config.precision,
        lr_scale_width=lr_scale_width(model), use_checkpoint=config.use_checkpoint, compile=config.compile,
        lora_only=lora_only, peak_flops=config.peak_flops, optimizer=config.optimizer, seed=config.seed,
        cuda_graphs=config.cuda_graphs,
    )


def __getattr__(name: str) -> Any:
    # `from fm9g.training.engine import TorchEngine` keeps working; imported lazily because
    # torch_engine imports this module.
    if name == "TorchEngine":
        from fm9g.training.torch_engine import TorchEngine

        return TorchEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
