"""The `Engine` protocol: what runs forward, backward and the optimizer step for the Trainer.

The Trainer owns the loop (data, schedule, logging, checkpoints); an :class:`Engine` owns the
model on its device(s) and the optimizer. The Trainer talks to an engine only through the
:class:`Engine` protocol below and reads each step's figures from a :class:`StepOutput`. Engines:
``torch`` (:class:`~fm9g.training.torch_engine.TorchEngine`: one step for one process and for
FSDP2 across processes, the parallelism applied to the built model by
:mod:`fm9g.training.parallelize`) and ``bmtrain`` (:class:`~fm9g.training.bmtrain_engine.BMTrainEngine`).
Which one runs is decided in one place, :func:`fm9g.training.builders.build_engine`; the arithmetic
every step shares lives in :mod:`fm9g.training.step_math`.

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
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Engine", "LMOutput", "StepOutput", "TrainableLM", "deferred_step_output", "REDUCE_OPS"]

# the reductions Engine.all_reduce accepts, in every engine
REDUCE_OPS = ("sum", "max", "min", "mean")


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
        """Reduce metric values across ranks (``op``: one of :data:`REDUCE_OPS`: ``"sum"``, ``"max"``,
        ``"min"``, ``"mean"``); identity in one process."""
        ...

    def memory_stats(self) -> dict[str, float]:
        """Device memory in GiB: ``allocated``, ``peak`` (``{}`` on CPU)."""
        ...

    def peak_flops(self) -> float | None:
        """Dense bf16 peak FLOP/s of one device (for MFU), or None if unknown."""
        ...


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
