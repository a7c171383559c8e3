"""Evaluation while training: held-out loss per task, the best checkpoint, early stopping.

Held-out data (docs/training.md, "Evaluation"): ``eval_split`` holds a share of every training
dataset's documents out of training (:mod:`fm9g.data.split`: the same lines on every run, rank
and resume), ``eval_data`` names extra datasets (entries in the mixture format, e.g. an indexed
``test.jsonl``). Each is read once, in a fixed order, by a :class:`~fm9g.data.mixture.MixtureLoader`
that does not repeat, packed like training rows and sharded over the ranks; at most
``eval_tokens`` tokens (over all ranks) are kept, in memory, and every evaluation scores the same
rows.

What is measured: the summed per-token loss and the count of labelled tokens per task (the
training loss's token weighting), summed over the ranks; ``loss`` = Σ loss / Σ tokens over all
tasks, ``perplexity`` = exp(loss). Evaluation runs under ``torch.no_grad`` in eval mode with the
RNG states saved and restored, so it changes nothing about training.

:class:`Evaluator` decides when (every ``eval_iters`` steps and at the end), keeps the history,
the best loss and its step, counts evaluations without improvement (``early_stopping_patience``,
``early_stopping_min_delta``) and says when a checkpoint must be written to keep the best
(``keep_best``). Its state travels in the checkpoint's trainer state, so a resumed run reports the
same evaluations and keeps the same ``best``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from fm9g.training.checkpoint import TRAINER_STATE, get_rng_state, set_rng_state
from fm9g.training.config import TrainConfig

__all__ = ["EvalResult", "Evaluator", "build_eval_loaders", "collect_batches", "evaluate_loss"]


@dataclass(kw_only=True)
class EvalResult:
    """One evaluation.

    Attributes:
        step: the optimizer step evaluated (weights after it).
        loss: mean loss over every labelled held-out token (all tasks, all ranks).
        perplexity: exp(loss).
        tokens: labelled tokens evaluated (all ranks).
        task_loss / task_tokens: the same per task name.
        is_best: the lowest loss so far.
        answers: ``eval_prompts`` -> greedy answer.
    """

    step: int
    loss: float
    perplexity: float
    tokens: int
    task_loss: dict[str, float] = field(default_factory=dict)
    task_tokens: dict[str, int] = field(default_factory=dict)
    is_best: bool = False
    answers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the jsonl row's ``eval`` record and the trainer state's history)."""
        return {"step": self.step, "loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "task_loss": dict(self.task_loss), "task_tokens": dict(self.task_tokens), "is_best": self.is_best,
                "answers": dict(self.answers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        return cls(step=int(d["step"]), loss=float(d["loss"]), perplexity=float(d["perplexity"]),
                   tokens=int(d["tokens"]), task_loss=dict(d.get("task_loss", {})),
                   task_tokens={k: int(v) for k, v in d.get("task_tokens", {}).items()},
                   is_best=bool(d.get("is_best", False)), answers=dict(d.get("answers", {})))

    def summary(self) -> str:
        """The console line."""
        tasks = " | ".join(f"{k}: {v:.4f}" for k, v in self.task_loss.items())
        best = " (best)" if self.is_best else ""
        return (f"eval @ {self.step}: loss {self.loss:.4f}{best} | ppl {self.perplexity:.3f} | tokens {self.tokens}"
                + (f"\n\ttask_loss: | {tasks} |" if tasks else ""))


# ------------------------------------------------------------------------------ held-out data
def _entries(config: TrainConfig, value: Any) -> tuple[list[Any], str | None]:
    """Dataset entries of ``data`` / ``eval_data`` (a config path or name, or a list) and the folder
    relative paths resolve against."""
    from fm9g.data.entries import load_dataset_config

    if isinstance(value, str):
        found = config.find_file(value, "dataset_configs")
        if found is None:
            raise FileNotFoundError(f"dataset config {value!r} not found (also looked for dataset_configs/{value}.json)")
        return load_dataset_config(found), None
    return load_dataset_config(list(value), base_dir=config.base_dir), config.base_dir


def build_eval_loaders(config: TrainConfig, tokenizer: Any, *, rank: int = 0, world_size: int = 1) -> list[Any]:
    """The loaders of the held-out data: ``eval_split`` of ``data`` (its ``"eval"`` side) and ``eval_data``.

    Every entry reads its documents once (``allow_repeat`` off), with the run's seed, rows and ranks.

    Returns:
        0 to 2 :class:`~fm9g.data.mixture.MixtureLoader` objects.
    """
    from fm9g.data.mixture import MixtureLoader

    settings = dict(seed=config.seed, rank=rank, world_size=world_size, num_workers=0)
    loaders = []
    if config.eval_split > 0 and config.data is not None:
        entries, base = _entries(config, config.data)
        entries = [replace(e, allow_repeat=False) for e in entries]
        loaders.append(MixtureLoader(entries, tokenizer, config.max_length, config.batch_size, base_dir=base,
                                     holdout=config.eval_split, split="eval", **settings))
    if config.eval_data is not None:
        entries, base = _entries(config, config.eval_data)
        entries = [replace(e, allow_repeat=False) for e in entries]
        loaders.append(MixtureLoader(entries, tokenizer, config.max_length, config.batch_size, base_dir=base, **settings))
    return loaders


def collect_batches(loaders: Iterable[Iterable[dict[str, Any]]], max_tokens: int | None,
                    world_size: int = 1) -> list[tuple[list[str], list[dict[str, Any]]]]:
    """The eval rows of this rank, ``(task names, rows)`` per loader: every batch of each loader in
    turn, until this rank's share of ``max_tokens`` (``max_tokens / world_size`` row tokens; None =
    all) is used."""
    budget = None if max_tokens is None else max(1, max_tokens // max(1, world_size))
    sets, used = [], 0
    for loader in loaders:
        rows: list[dict[str, Any]] = []
        for batch in loader:
            if budget is not None and used >= budget:
                break
            rows.append({k: v for k, v in batch.items() if k != "sample_lines"})
            used += int(batch["input_ids"].numel())
        names = list(getattr(loader, "task_names", None) or (rows[0]["task_names"] if rows else []))
        sets.append((names, rows))
    return sets


def _task_sums(token_loss: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
               n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_tasks,) float64 summed loss and (n_tasks,) int64 labelled-token count of one batch."""
    keep = (labels.reshape(-1) != -100) & (task_ids.reshape(-1) >= 0)
    ids = task_ids.reshape(-1)[keep]
    sums = torch.zeros(n_tasks, dtype=torch.float64, device=token_loss.device)
    sums.index_add_(0, ids, token_loss.reshape(-1)[keep].double())
    return sums, torch.bincount(ids, minlength=n_tasks)[:n_tasks]


def evaluate_loss(model: torch.nn.Module, batches: Sequence[dict[str, Any]], task_names: Sequence[str], *,
                  device: torch.device,
                  autocast_dtype: torch.dtype | None = None,
                  all_reduce: Callable[..., dict[str, float]] | None = None) -> tuple[dict[str, float], dict[str, int]]:
    """Summed loss and labelled-token count per task over ``batches`` (this rank's rows), summed over ranks.

    Every rank runs the same number of forwards (a rank with fewer rows runs fully masked ones), so
    sharded models (FSDP) gather their weights in step.

    Args:
        model: the (possibly wrapped) model; called as ``model(input_ids, position_ids=, cu_seqlens=,
            labels=, max_seqlen=)`` and returning ``.token_loss`` (B, T).
        batches: packed batch dicts with ``task_ids`` (indices into ``task_names``).
        task_names: the tasks of the eval set (the same list on every rank).
        device: where the model runs.
        autocast_dtype: bf16 autocast (as in training) or None.
        all_reduce: the engine's ``all_reduce(values, op)`` (None: one process).
    Returns:
        ({task: loss sum}, {task: labelled tokens}) over all ranks.
    """
    reduce = all_reduce or (lambda values, op="sum": dict(values))
    names = list(task_names)
    rounds = int(reduce({"n": float(len(batches))}, op="max")["n"])
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    counts = torch.zeros(len(names), dtype=torch.int64, device=device)
    for i in range(rounds):
        b = batches[min(i, len(batches) - 1)] if batches else None
        ids = b["input_ids"].to(device) if b is not None else torch.zeros(1, 8, dtype=torch.long, device=device)
        labels = b["labels"].to(device) if b is not None and i < len(batches) else torch.full_like(ids, -100)
        kwargs = {} if b is None else {"position_ids": b["position_ids"].to(device), "cu_seqlens": b["cu_seqlens"],
                                       "max_seqlen": b.get("max_seqlen")}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(ids, labels=labels, **kwargs)
        if b is not None and i < len(batches):
            s, c = _task_sums(out.token_loss, labels, b["task_ids"].to(device), len(names))
            sums, counts = sums + s, counts + c
    local = {f"sum/{n}": float(sums[j]) for j, n in enumerate(names)}
    local.update({f"count/{n}": float(counts[j]) for j, n in enumerate(names)})
    total = reduce(local, op="sum")
    return ({n: total[f"sum/{n}"] for n in names}, {n: int(round(total[f"count/{n}"])) for n in names})


def _reshard(model: torch.nn.Module) -> None:
    """Free the weights FSDP2 gathered for the evaluation's forwards: a forward without a backward
    leaves the root module unsharded, and a checkpoint or the next step expects sharded weights."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing can be sharded
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _merge(parts: Iterable[tuple[dict[str, float], dict[str, int]]]) -> tuple[dict[str, float], dict[str, int]]:
    """Per-task sums of several eval sets added by task name."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for s, c in parts:
        for k in s:
            sums[k] = sums.get(k, 0.0) + s[k]
            counts[k] = counts.get(k, 0) + c[k]
    return sums, counts


def result_from_sums(step: int, sums: dict[str, float], counts: dict[str, int]) -> EvalResult:
    """An :class:`EvalResult` (not yet compared with the best) from per-task sums."""
    total, n = sum(sums.values()), sum(counts.values())
    loss = total / n if n else float("nan")
    return EvalResult(step=step, loss=loss, perplexity=math.exp(min(loss, 700.0)) if n else float("nan"), tokens=n,
                      task_loss={k: sums[k] / counts[k] for k in sums if counts[k]},
                      task_tokens={k: counts[k] for k in sums})


# ------------------------------------------------------------------------------ the evaluator
class Evaluator:
    """When to evaluate, what came out, the best loss, early stopping (module docstring).

    Args:
        config: the run's TrainConfig (``eval_iters``, ``eval_tokens``, ``keep_best``,
            ``early_stopping_patience``, ``early_stopping_min_delta``, ``eval_prompts``).
        loaders: a function returning the eval loaders (called once, on first use), or the eval
            sets themselves: ``[(task names, [batch, ...]), ...]``.
        world_size: processes the ``eval_tokens`` budget is split over.
        prompts: a :class:`fm9g.training.prompts.PromptFormat` for ``eval_prompts``, or a function
            that makes one on first use (None: no answers).
    """

    def __init__(self, config: TrainConfig, loaders: Callable[[], list[Any]] | list[tuple[list[str], list[dict]]],
                 *, world_size: int = 1, prompts: Any = None) -> None:
        self.config = config
        self._loaders = loaders
        self._sets: list[tuple[list[str], list[dict[str, Any]]]] | None = None if callable(loaders) else list(loaders)
        self.world_size = world_size
        self.prompts = prompts
        self.history: list[EvalResult] = []
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0  # evaluations in a row without improvement
        self.stop_reason: str | None = None

    def sets(self) -> list[tuple[list[str], list[dict[str, Any]]]]:
        """The eval rows of this rank (built and kept on first use)."""
        if self._sets is None:
            assert callable(self._loaders)
            self._sets = collect_batches(self._loaders(), self.config.eval_tokens, self.world_size)
        return self._sets

    def due(self, step: int, *, final: bool = False) -> bool:
        """An evaluation is due after ``step``: every ``eval_iters`` steps, and at the end (``final``),
        never twice for one step."""
        n = self.config.eval_iters
        if not n or step <= 0 or (self.history and self.history[-1].step == step):
            return False
        return final or step % n == 0

    def wants_save(self, step: int) -> bool:
        """``keep_best``: the evaluation of ``step`` is the best so far, so its weights must be saved."""
        last = self.history[-1] if self.history else None
        return bool(self.config.keep_best and last is not None and last.step == step and last.is_best)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, *, device: torch.device,
                 autocast_dtype: torch.dtype | None = None,
                 all_reduce: Callable[..., dict[str, float]] | None = None) -> EvalResult:
        """Score the held-out rows (and answer ``eval_prompts``) with the weights after ``step``;
        record the result (best, early stopping). RNG states and the train / eval mode are restored."""
        rng, was_training = get_rng_state(), model.training
        model.eval()
        try:
            parts = [evaluate_loss(model, rows, names, device=device, autocast_dtype=autocast_dtype, all_reduce=all_reduce)
                     for names, rows in self.sets()]
            result = result_from_sums(step, *_merge(parts))
            if self.prompts is not None and self.config.eval_prompts:
                result.answers = self.answer(model, self.config.eval_prompts, device=device)
        finally:
            model.train(was_training)
            set_rng_state(rng)
            _reshard(model)
        self._record(result)
        return result

    def answer(self, model: Any, questions: Sequence[str], *, device: torch.device, max_new_tokens: int = 64) -> dict[str, str]:
        """Greedy answers to ``questions`` (one batch, left-padded) in the run's prompt format."""
        if callable(self.prompts):  # built on first use (the tokenizer exists by then)
            self.prompts = self.prompts()
        ids = [self.prompts.ids(q) for q in questions]
        T = max(map(len, ids))
        batch = torch.zeros(len(ids), T, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, row in enumerate(ids):
            batch[i, T - len(row):], mask[i, T - len(row):] = torch.tensor(row), 1
        out = model.generate(batch.to(device), max_new_tokens, attention_mask=mask.to(device),
                             eos_token_id=self.prompts.stop_ids or None)
        return {q: self.prompts.decode(out[i, T:].tolist()) for i, q in enumerate(questions)}

    def _record(self, result: EvalResult) -> None:
        """Compare with the best: a lower loss is the new best (``keep_best`` keeps its checkpoint);
        only a loss lower than the previous best by more than ``early_stopping_min_delta`` resets the
        count of evaluations without improvement, which decides early stopping."""
        c = self.config
        finite, prev = math.isfinite(result.loss), self.best_loss
        result.is_best = finite and (prev is None or result.loss < prev)
        improved = finite and (prev is None or result.loss < prev - c.early_stopping_min_delta)
        self.bad_evals = 0 if improved else self.bad_evals + 1
        if result.is_best:
            self.best_loss, self.best_step = result.loss, result.step
        self.history.append(result)
        if c.early_stopping_patience and self.bad_evals >= c.early_stopping_patience:
            self.stop_reason = (
                f"early stopping after step {result.step}: the eval loss did not improve on {self.best_loss:.4f} "
                f"(step {self.best_step}) by more than early_stopping_min_delta={c.early_stopping_min_delta:g} "
                f"in {self.bad_evals} evaluations (early_stopping_patience={c.early_stopping_patience})")

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """History, best loss and step, evaluations without improvement (plain values)."""
        return {"history": [r.to_dict() for r in self.history], "best_loss": self.best_loss,
                "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from :meth:`state_dict` (None: a checkpoint written without evaluation)."""
        state = state or {}
        self.history = [EvalResult.from_dict(d) for d in state.get("history", [])]
        self.best_loss = state.get("best_loss")
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.stop_reason = None

    def restore(self, checkpoint: str | Path) -> None:
        """Load the evaluation state recorded in a checkpoint folder's trainer state."""
        state = torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=True)
        self.load_state_dict(state.get("evaluation") if isinstance(state, dict) else None)
