"""The Trainer: one loop you can read in one screen.

    trainer = Trainer(TrainConfig.from_json("train.json"))     # builds model, tokenizer, loader
    trainer.fit()

    trainer = Trainer(cfg, model=my_model, loader=my_loader)   # composable: bring your own pieces
    trainer.fit()

Each iteration k = 1 .. train_iters: take ``grad_accum`` packed batches from the loader, let the
engine run forward/backward/clip/update with ``lr(k)`` (see :mod:`fm9g.training.schedules`), log,
and every ``save_iters`` write a checkpoint (:mod:`fm9g.training.checkpoint`). A step whose loss or
gradient is not finite is skipped (no update; the iteration number does not advance) and counted;
``max_bad_steps`` of them in a row stop the run with :class:`TrainingError`. With
``ignore_cuda_oom`` a batch that runs out of GPU memory is skipped the same way.

Resuming (``resume_ckpt``: a step, ``"latest"`` or a path) restores the weights (LoRA runs: the
LoRA tensors, on top of ``pretrained_model``), the optimizer, the loader position, the token
counters and every RNG, so k steps + resume + (N-k) steps gives the same losses and the same final
weights as N steps straight. A checkpoint lacking optimizer or loader state, or a LoRA checkpoint
of other settings or another base, is refused unless an option says to go on; checkpoints follow
the run's lineage (docs/checkpoints.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from fm9g.models.lora import apply_lora
from fm9g.training.builders import (
    build_engine, build_loader, build_model, build_tokenizer, pretrained_state, run_data_parallel, seed_everything,
    set_deterministic,
)
from fm9g.training.checkpoint import (
    all_finite, get_rng_state, latest_checkpoint, list_checkpoints, read_lineage, save_checkpoint,
)
from fm9g.training.callbacks import Callback, CallbackList
from fm9g.training.config import TrainConfig
from fm9g.training.eval_loop import best_to_protect, build_evaluator, run_evaluation
from fm9g.training.distributed import explain_collective_errors
from fm9g.training.engine import Engine, StepOutput
from fm9g.training.metrics import MetricsLogger, dropped_records, dropped_since, flops_per_token, inspect_model, mfu
from fm9g.training.resume import resume as resume_checkpoint
from fm9g.training.run_checks import base_identity, check_device, check_start, fresh_start_text, has_lora, lora_settings
from fm9g.training.run_guard import DEFAULT_RESUME_HINT, finish_interrupted, guard_run, stop_agreed, stop_now
from fm9g.training.schedules import lr_at, schedule_text, schedule_warnings
from fm9g.training.step_math import stage_batch
from fm9g.training.step_clock import StepClock

__all__ = ["Trainer", "TrainResult", "TrainingError", "build_model", "build_tokenizer", "build_loader", "pretrained_state",
           "seed_everything"]

class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps, data ran out, bad resume)."""


@dataclass(kw_only=True)
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        step: the last completed iteration.
        losses: loss of every completed iteration of this call, in order.
        tokens: real tokens trained on over the whole run (resumes included).
        skipped: skipped batches by reason (``nonfinite``, ``oom``).
        last_checkpoint: the folder written last, if any.
        dropped: records the loader read and dropped over the run, ``{task: {reason: count}}`` (the
            transform returned None, empty output, too long, no trained turn); only tasks that dropped some.
        stop_reason: ``"train_iters"``, ``"data_exhausted"``, ``"interrupted"`` (SIGINT / SIGTERM;
            ``signal`` holds its number: the command exits with 128 + signal), ``"early_stopping"``
            (``early_stopping_patience``), ``"requested"`` (:meth:`Trainer.request_stop`).
    """

    step: int
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    stop_reason: str = "train_iters"
    signal: int | None = None


# ------------------------------------------------------------------------------ the trainer
class Trainer:
    """Trains a model with a :class:`TrainConfig`.

    Args:
        config: the run's configuration.
        model: a built model (default: :func:`build_model` from the config). LoRA from
            ``config.lora`` is applied if the model has none yet.
        loader: any iterable of packed batch dicts (default: :func:`build_loader`); its
            ``state_dict()`` / ``load_state_dict()`` are saved / restored when present.
        tokenizer: used to build the default loader (default: :func:`build_tokenizer`).
        engine: a ready engine (default: :func:`fm9g.training.builders.build_engine`).
        log_stream: where console lines go (default stdout).
        callbacks: :class:`~fm9g.training.callbacks.Callback` objects (``on_step_end``,
            ``on_eval``, ``on_save``, ``on_fit_end``); evaluation is built from the config
            (``eval_iters``; :mod:`fm9g.training.evaluate`) as :attr:`evaluator`.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module | None = None,
        loader: Iterable[dict[str, Any]] | None = None,
        *,
        tokenizer: Any = None,
        engine: Engine | None = None,
        log_stream: Any = None,
        callbacks: Iterable[Callback] | None = None,
    ) -> None:
        self.config = config
        seed_everything(config.seed)
        set_deterministic(config.deterministic)
        if engine is None:
            check_device(config.device)
        self._model_from_config = model is None and engine is None
        if model is None and engine is None and run_data_parallel(config) != "none":
            # torchrun: the FSDP2 engine builds the model on the meta device and loads each rank's shard
            engine = build_engine(config, None, lora_only=config.lora is not None)
        if model is None and engine is not None:
            model = engine.model
        if model is None:
            dev = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            model = build_model(config, device=dev if dev.startswith("cuda") else None)
        if config.lora is not None and not has_lora(model):
            apply_lora(model, config.lora)
        self.is_lora = has_lora(model)
        self.model = model
        self._base_identity = base_identity(model, config) if self.is_lora else None  # before any wrapping
        self.engine = engine or build_engine(config, model, lora_only=self.is_lora)
        self.tokenizer = tokenizer
        self._loader = loader
        self._data_iter: Iterator[dict[str, Any]] | None = None
        self.log_stream = log_stream
        # run state (saved in checkpoints)
        self.step = 0
        self.tokens = 0
        self.task_tokens: dict[str, int] = {}
        self.skipped: dict[str, int] = {"nonfinite": 0, "oom": 0}
        self.bad_in_row = 0
        self.last_checkpoint: Path | None = None
        self._resumed = False
        # the checkpoints this state descends from ((id, step), oldest first) and where it resumed
        self._history: tuple[tuple[str, int], ...] = ()
        self._resumed_from: Path | None = None
        self.resume_summary: str | None = None  # what the last resume restored and what not
        # the stop signals of a running fit, the text that tells how to resume, and the step clock
        self._stop: Any = None
        self._stopping = False
        self.resume_hint = DEFAULT_RESUME_HINT
        self.clock = StepClock()
        # rows come from the loader when one is given (it may pack other lengths than the config)
        self.batch_size = int(getattr(loader, "batch_size", None) or config.batch_size)
        self.max_length = int(getattr(loader, "max_length", None) or config.max_length)
        self.flops_per_token = flops_per_token(self.model, self.max_length)
        self.logger: MetricsLogger | None = None
        self.callbacks = CallbackList(callbacks or (), is_main=self.engine.is_main)
        self.evaluator = build_evaluator(self)  # None without eval_iters
        self.stop_request: tuple[str, str] | None = None  # (stop_reason, why): see request_stop

    def request_stop(self, why: str, *, reason: str = "requested") -> None:
        """Stop :meth:`fit` after the step in hand (a final checkpoint is saved); ``why`` is printed.

        Args:
            why: the message for the console.
            reason: the :attr:`TrainResult.stop_reason` (``"early_stopping"`` from evaluation).
        """
        if self.stop_request is None:
            self.stop_request = (reason, why)
            if self.logger is not None:
                self.logger.print(f"stopping: {why}")

    # ------------------------------------------------------------------ pieces
    @property
    def loader(self) -> Iterable[dict[str, Any]]:
        """The data loader (built from the config on first use)."""
        if self._loader is None:
            if self.tokenizer is None:
                self.tokenizer = build_tokenizer(self.config)
            self._loader = build_loader(self.config, self.tokenizer, rank=self.engine.rank,
                                        world_size=self.engine.world_size)
        return self._loader

    def lr_at(self, step: int) -> float:
        """The peak-group learning rate iteration ``step`` trains with."""
        c = self.config
        return lr_at(step, c.lr, scheduler=c.lr_scheduler, warmup_iters=c.warmup_steps, drop_iters=c.drop_steps,
                     train_iters=c.train_iters, drop_begin=c.drop_begin, drop_rate=c.drop_rate)

    def task_names(self, batch: dict[str, Any] | None = None) -> list[str]:
        if batch is not None and batch.get("task_names"):
            return list(batch["task_names"])
        return list(getattr(self._loader, "task_names", []) or [])

    def describe(self) -> str:
        """One paragraph about the run: model size, trainable share, engine, device, schedule."""
        c = self.config
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        eng = self.engine
        where = f"{eng.name} engine on {eng.device}, precision {eng.precision}"
        if c.optimizer != "adamw":
            where += f", optimizer {c.optimizer}"
        mesh = getattr(eng, "mesh", None)
        if mesh is not None:  # e.g. "FSDP2 over 2 replicate x 8 shard" (hybrid: nodes x ranks per node)
            names = mesh.mesh_dim_names or ("ranks",) * mesh.ndim  # a mesh passed in without names
            where += ", FSDP2 over " + " x ".join(f"{n} {name}" for name, n in zip(names, mesh.shape))
        return (
            f"fm9g train: {total / 1e6:,.2f}M parameters, {trainable / 1e6:,.2f}M trainable"
            f"{' (LoRA)' if self.is_lora else ''}; {where}\n"
            f"  {c.train_iters} iterations of {c.grad_accum} x {self.batch_size} x {self.max_length} tokens; "
            f"{schedule_text(c)}; starting after step {self.step}; checkpoints: {c.run_dir or 'off'}\n"
            f"  start: {self.resume_summary or fresh_start_text(self)}"
        ) + "".join(f"\n  warning: {w}" for w in schedule_warnings(c))

    def train_step(self, batches: list[dict[str, Any]]) -> StepOutput:
        """The Trainer's half of iteration ``self.step + 1`` over ``batches`` (grad_accum micro-batches).

        The engine runs forward / backward / clip / update (:meth:`Engine.train_step`); here: the
        learning rate of the iteration, the out-of-memory skip (``ignore_cuda_oom``), the skip
        bookkeeping and the counters. A skipped step leaves ``self.step`` unchanged.

        Returns:
            The engine's :class:`StepOutput` (global figures).
        """
        return self._settle(self._launch(batches), batches)

    def _launch(self, batches: list[dict[str, Any]], after: StepOutput | None = None) -> StepOutput:
        """Queue iteration ``self.step + 1`` on the engine (its figures may still be on the device);
        with ``after`` (a step queued but not settled) the iteration after it: ``self.step + 2``
        if ``after`` updates the weights, else ``self.step + 1`` (the engine picks the learning
        rate on the device)."""
        try:
            if after is not None:
                return self.engine.train_step(batches, self.lr_at(self.step + 2), after=after,
                                              lr_if_skipped=self.lr_at(self.step + 1))
            return self.engine.train_step(batches, self.lr_at(self.step + 1))
        except torch.cuda.OutOfMemoryError:
            if not self.config.ignore_cuda_oom:
                raise
            self.engine.zero_grad()
            torch.cuda.empty_cache()
            return StepOutput(loss=float("nan"), num_label_tokens=0, num_tokens=0, skipped="oom")

    def _settle(self, out: StepOutput, batches: list[dict[str, Any]]) -> StepOutput:
        """Read the step's figures (waits for the device) and do the skip bookkeeping and counters."""
        if out.skipped:
            self.skipped[out.skipped] = self.skipped.get(out.skipped, 0) + 1
            self.bad_in_row += 1
            return out
        self.bad_in_row = 0
        self.step += 1
        self.tokens += out.num_tokens  # already the count over every rank
        names = self.task_names(batches[0])
        for tid, n in out.task_tokens.items():
            name = names[tid] if tid < len(names) else str(tid)
            self.task_tokens[name] = self.task_tokens.get(name, 0) + n
        return out

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """Train until ``train_iters`` (or the data ends when ``stop_when_end`` is False).

        The run folder is locked for the whole call (one writer per folder; another live run's
        folder is refused at once, :mod:`fm9g.training.run_lock`). SIGINT / SIGTERM stop after the
        step in hand, save it (``save_on_interrupt``) and return with ``stop_reason
        "interrupted"``; a second signal raises :class:`~fm9g.training.interrupts.RunInterrupted`.

        Returns:
            :class:`TrainResult`. Raises :class:`TrainingError` after ``max_bad_steps``
            consecutive skipped steps, naming the reason, and
            :class:`~fm9g.training.distributed.DistributedError` when another rank died or a
            collective timed out (naming the rank and what to do).
        """
        # a dead or stuck rank: one line; outside guard_run, whose exit restores the signal handlers
        # before the explanation makes torchrun's SIGTERM wait for the line to be printed
        with explain_collective_errors(), guard_run(self) as self._stop:
            try:
                return self._fit()
            finally:
                self._stop = None

    def _fit(self) -> TrainResult:
        """The loop of :meth:`fit` (the run folder's lock and the stop signals held)."""
        cfg = self.config
        if cfg.resume_ckpt is not None and not self._resumed:
            self.resume(cfg.resume_ckpt)
        check_start(self)
        if self._data_iter is None:
            self._data_iter = iter(self.loader)
        self.logger = logger = self._open_logger()
        self.dropped = dropped_records(self._loader)  # per task and reason (the loader's state keeps them)
        result = TrainResult(step=self.step)
        logger.print(self.describe())
        # Per iteration: launch the step; write the PREVIOUS step's log line while the device runs
        # it; fetch and stage the next batches; where the engine can (launch_ahead) queue the next
        # step behind this one already, so the device never waits for the host; then read this
        # step's figures (the one wait for the device per step) and decide: skipped (the iteration
        # does not advance), log, save.
        pending: tuple[int, dict[str, Any], dict[str, float]] | None = None
        ahead: tuple[StepOutput, list[dict[str, Any]], float] | None = None  # queued, not settled
        self.clock = clock = StepClock(self.clock.clock)
        try:
            batches = self._next_batches() if self._goes_on() else None
            while self._goes_on():
                if ahead is not None:
                    (out, batches, t0), ahead = ahead, None
                else:
                    if batches is None:
                        pending = self._write_log(pending)
                        result.stop_reason = "data_exhausted"
                        logger.print(f"data ran out after iteration {self.step} of train_iters={cfg.train_iters}; stopping")
                        break
                    t0 = clock.now()
                    out = self._launch(batches)
                pending = self._write_log(pending)
                self._stopping = stop_agreed(self)
                prefetched = self._may_prefetch()
                upcoming = self._next_batches() if prefetched else None
                if upcoming is not None and self._may_launch_ahead():
                    t_next = clock.now()
                    ahead, upcoming = (self._launch(upcoming, after=out), upcoming, t_next), None
                self._settle(out, batches)
                pending = self._after_step(out, batches, clock.settled(t0, ahead[2] if ahead else None), result.losses)
                if stop_now(self, result, nothing_in_hand=ahead is None and not prefetched):
                    break
                if ahead is None:
                    if not prefetched:  # fetched now only if the loop goes on (the loader state is saved at the end)
                        upcoming = self._next_batches() if self._goes_on() else None
                    batches = upcoming
            pending = self._write_log(pending)
            finish_interrupted(self) if result.stop_reason == "interrupted" else self._end_of_run(result)
        finally:
            self._write_log(pending)
            logger.close()
        if result.stop_reason == "data_exhausted" and not cfg.stop_when_end:
            raise self._data_ran_out()
        result.step, result.tokens, result.skipped = self.step, self.tokens, dict(self.skipped)
        result.last_checkpoint = self.last_checkpoint
        result.dropped = {k: dict(why) for k, why in self.dropped.items() if why}
        self.callbacks.call("on_fit_end", self, result)
        return result

    # ------------------------------------------------------------------ pieces of the loop
    def _end_of_run(self, result: TrainResult) -> None:
        """After the loop (not interrupted): the final evaluation and checkpoint, and the reason of
        a requested stop (early stopping, a callback)."""
        run_evaluation(self, final=True)
        self._maybe_save(final=True)
        if self.stop_request is not None:
            result.stop_reason = self.stop_request[0]

    def _after_step(self, out: StepOutput, batches: list[dict[str, Any]], times: tuple[float, float],
                    losses: list[float]) -> tuple[int, dict[str, Any], dict[str, float]] | None:
        """After a settled step: report a skip, or keep its loss in `losses` and return its deferred
        log line (written at once when the model inspection or a checkpoint follows this step)."""
        if out.skipped:
            self._report_skip(out)
            return None
        losses.append(out.loss)
        pending = (self.step, self._metrics_row(out, batches, *times), self._task_losses(out, batches))
        if self.evaluator is not None and self.evaluator.due(self.step):  # before the save: keep_best saves
            with self.clock.paused():
                run_evaluation(self)
            pending[1]["eval_time"] = self.clock.last_pause
        save_due = self._save_due()
        if save_due:  # the save's time is logged apart (save_time) and is no step's time
            with self.clock.paused():
                self._maybe_save()
            pending[1]["save_time"] = self.clock.last_pause
        if self.config.inspect_iters and self.step % self.config.inspect_iters == 0:
            pending = self._write_log(pending)
            assert self.logger is not None
            with self.clock.paused():
                self.logger.print(inspect_model(self.model))
        return self._write_log(pending) if save_due else pending

    def _data_ran_out(self) -> TrainingError:
        """The error of a run whose data ended before ``train_iters`` with ``stop_when_end`` false."""
        cfg = self.config
        return TrainingError(
            f"the data ran out after iteration {self.step} of train_iters={cfg.train_iters}"
            + (f" (checkpoint {self.last_checkpoint} was written)" if self.last_checkpoint else "")
            + "; with stop_when_end false the run must reach train_iters: let the datasets repeat "
            "(\"allow_repeat\": true in the dataset config), lower train_iters, or set stop_when_end: true "
            "to stop when the data ends")

    def _open_logger(self) -> MetricsLogger:
        """The run's logger; TensorBoard and train_stats folders resolved from the config
        (``"auto"``: inside the run folder). Only the main rank writes."""
        cfg, run_dir = self.config, self.config.run_dir

        stats = self._log_folder(cfg.stats_dir, "train_stats") if run_dir is not None else None
        return MetricsLogger(
            total_steps=cfg.train_iters, start_step=self.step, tensorboard_dir=self._log_folder(cfg.tensorboard, "tensorboard"),
            stats_dir=stats, log_iters=cfg.log_iters, progress_bar=cfg.progress_bar, enabled=self.engine.is_main,
            stream=self.log_stream, tensorboard_task_loss=cfg.log_task_loss,
        )

    def _log_folder(self, value: str | None, auto: str) -> Path | None:
        """A log folder of the config: ``"auto"`` = ``<run_dir>/<auto>``; ``"original"`` (TensorBoard) =
        the original launcher's ``<save>/../tensorboard/<exp_group><model_unique>``; None when off."""
        cfg, run_dir = self.config, self.config.run_dir
        if value is None or (value in ("auto", "original") and run_dir is None):
            return None
        if value == "original":
            return run_dir.parent.parent / "tensorboard" / f"{cfg.exp_group}{cfg.model_unique}"
        return run_dir / auto if value == "auto" else Path(cfg.output_path(value))

    def _next_batches(self) -> list[dict[str, Any]] | None:
        """The next ``grad_accum`` micro-batches, staged on the engine's device (pinned,
        non-blocking copies on CUDA), or None when the data ran out first."""
        assert self._data_iter is not None
        batches = []
        for _ in range(self.config.grad_accum):
            try:
                batches.append(stage_batch(next(self._data_iter), self.engine.device))
            except StopIteration:
                return None
        return batches

    def _goes_on(self) -> bool:
        """The loop trains another iteration: every run ends at ``train_iters`` (or a requested stop)."""
        return self.step < self.config.train_iters and self.stop_request is None

    def _may_prefetch(self) -> bool:
        """Whether the next batches may be fetched before this step's figures are read: only when
        the loop surely goes on and no checkpoint can follow this step (a checkpoint saves the
        loader position, which must not include batches fetched ahead)."""
        cfg, k = self.config, self.step + 1
        if k >= cfg.train_iters or self._stopping or self.stop_request is not None:
            return False
        if self.evaluator is not None and self.evaluator.due(k):  # reads the weights of step k; may save
            return False
        return not (cfg.run_dir is not None and cfg.save_iters and k % cfg.save_iters == 0)

    def _may_launch_ahead(self) -> bool:
        """Whether the next step may be queued before this one's figures are read (called after
        :meth:`_may_prefetch` allowed the next batches): the engine can choose the learning rate on
        the device, and nothing after this step reads the weights (no model inspection) or could
        stop the run (a skip here cannot reach ``max_bad_steps``). Checkpoints and the last
        iteration are already excluded by the prefetch rule."""
        cfg = self.config
        if not getattr(self.engine, "launch_ahead", False):
            return False
        if cfg.inspect_iters and (self.step + 1) % cfg.inspect_iters == 0:
            return False
        return self.bad_in_row + 1 < cfg.max_bad_steps

    def _save_due(self) -> bool:
        """A checkpoint is due after this step (every ``save_iters``)."""
        cfg = self.config
        best = self.evaluator is not None and self.evaluator.wants_save(self.step)  # keep_best
        return cfg.run_dir is not None and (bool(cfg.save_iters) and self.step % cfg.save_iters == 0 or best)

    def _write_log(self, pending: tuple[int, dict[str, Any], dict[str, float]] | None) -> None:
        """Write a deferred log line (step, metrics row, task losses); returns None (nothing pending)."""
        if pending is not None and self.logger is not None:
            self.logger.log(*pending)
            self.callbacks.call("on_step_end", self, *pending)
        return None

    def _report_skip(self, out: StepOutput) -> None:
        """Log a skipped step; raise :class:`TrainingError` after ``max_bad_steps`` in a row."""
        why = "loss or gradient not finite" if out.skipped == "nonfinite" else "CUDA out of memory"
        assert self.logger is not None
        self.logger.print(f"iteration {self.step + 1}: batch skipped ({why}); "
                          f"{self.bad_in_row} in a row, {sum(self.skipped.values())} in total")
        if self.bad_in_row >= self.config.max_bad_steps:
            raise TrainingError(
                f"{self.bad_in_row} consecutive steps were skipped ({out.skipped}) at iteration {self.step + 1}; "
                "stopping. Lower lr, check the data, or resume from an earlier checkpoint "
                f"(max_bad_steps={self.config.max_bad_steps})"
            )

    def _metrics_row(self, out: StepOutput, batches: list[dict[str, Any]], iter_time: float,
                     model_time: float) -> dict[str, Any]:
        """The logged figures of a completed step (tokens are global; MFU is per device)."""
        world = self.engine.world_size
        tps = out.num_tokens / max(iter_time, 1e-9)
        slots = world * sum(int(b["labels"].numel()) for b in batches)  # label slots over all ranks
        row = {
            "loss": out.loss, "lr": self.lr_at(self.step), "grad_norm": out.grad_norm,
            "tokens_per_s": tps, "mfu": mfu(tps / world, self.flops_per_token, self.engine.peak_flops()),
            "iter_time": iter_time, "model_time": model_time, "token_pass": self.tokens,
            "num_tokens": out.num_tokens, "num_label_tokens": out.num_label_tokens,
            "mask_max": out.num_label_tokens / max(1, slots),
        }
        dropped = dropped_since(self._loader, self.dropped)
        if dropped:  # records dropped since the last step, per task and reason
            row["dropped"] = dropped
        mem = self.engine.memory_stats()
        if mem:
            row["mem_gb"], row["peak_mem_gb"] = mem["allocated"], mem["peak"]
        return row

    def _task_losses(self, out: StepOutput, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Mean loss per task name of a step (always; ``log_task_loss`` only decides the TensorBoard scalars)."""
        names = self.task_names(batches[0])
        return {(names[tid] if tid < len(names) else str(tid)): s / out.task_label_tokens[tid]
                for tid, s in out.task_loss_sum.items() if out.task_label_tokens.get(tid, 0)}

    def _maybe_save(self, *, final: bool = False) -> None:
        """Save every ``save_iters`` steps, and at the end (``save_final``) unless this step is saved."""
        cfg = self.config
        if cfg.run_dir is None:
            return
        if final:  # a stop (early stopping) and keep_best save even without save_final
            wanted = cfg.save_final or self.stop_request is not None or self._save_due()
            due = wanted and self.step > 0 and (
                self.last_checkpoint is None or self.last_checkpoint.name != str(self.step))
        else:
            due = self._save_due()
        if due:
            self.save()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Trainer state: step, counters, RNG states, whether this is a LoRA run (and then its
        LoRA settings and the identity of its pretrained base, checked on resume)."""
        state = {
            "step": self.step, "tokens": self.tokens, "task_tokens": dict(self.task_tokens),
            "skipped": dict(self.skipped), "rng": get_rng_state(), "is_lora": self.is_lora,
            "seed": self.config.seed,
        }
        if self.is_lora:
            state["lora"] = lora_settings(self.model)
            state["pretrained"] = dict(self._base_identity or {})
        if self.evaluator is not None:
            state["evaluation"] = self.evaluator.state_dict()
        return state

    def save(self) -> Path:
        """Write checkpoint ``<save>/<model_unique>/<step>/`` (atomically) and return its folder.

        The checkpoint continues this run's lineage (docs/checkpoints.md): checkpoints of the run
        folder outside it move to ``abandoned/``, ``keep_last`` prunes only older ones of it and
        never the checkpoint this run resumed from.

        Raises:
            TrainingError: the weights hold inf/NaN; nothing is written, moved or pruned.
        """
        cfg = self.config
        run_dir = cfg.run_dir
        if run_dir is None:
            raise ValueError("save is null: set `save` to a directory to write checkpoints")
        self._check_finite_weights()
        loader = self._loader
        loader_state = loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None
        mc = getattr(self.model, "config", None)
        # checkpoint_format "sharded" (several ranks): model + optimizer go to <step>/dcp/ instead
        sharded = self.engine.world_size > 1 and cfg.checkpoint_format == "sharded"
        path = save_checkpoint(
            run_dir, self.step,
            model_state={} if sharded else self.engine.model_state_dict(lora_only=self.is_lora),
            optimizer_state={"world_size": self.engine.world_size} if sharded else self.engine.optimizer_state_dict(),
            loader_state=loader_state,
            trainer_state=self.state_dict(),
            model_config=mc.to_dict() if hasattr(mc, "to_dict") else None,
            train_config=cfg.to_dict(),
            keep_last=cfg.keep_last,
            rank=self.engine.rank,
            world_size=self.engine.world_size,
            barrier=self.engine.barrier,
            sharded_writer=getattr(self.engine, "save_sharded") if sharded else None,
            history=self._history,
            protect=([self._resumed_from] if self._resumed_from is not None else []) + best_to_protect(self),
        )
        self._history = read_lineage(path).chain
        self.last_checkpoint = path
        if self.logger is not None:
            self.logger.print(f"saved checkpoint {path}")
        self.callbacks.call("on_save", self, path)
        return path

    def _check_finite_weights(self) -> None:
        """Refuse to save inf/NaN weights (one fused reduction, one host sync; every rank agrees)."""
        params = [p for p in self.engine.model.parameters() if p.requires_grad]
        bad = 0.0 if all_finite(params) else 1.0
        if self.engine.all_reduce({"nonfinite": bad})["nonfinite"] == 0:
            return
        last = self.last_checkpoint or latest_checkpoint(self.config.run_dir)
        good = (f"the last good checkpoint is {last} (resume_ckpt={last.name})" if last is not None
                else "this run has no checkpoint yet")
        raise TrainingError(
            f"not saving checkpoint {self.step}: the model weights hold inf or NaN after iteration {self.step} "
            f"(an update overflowed; lr is {self.config.lr:g}); nothing was written or pruned. "
            f"Lower lr (or clip_grad) and restart; {good}"
        )

    def resume(self, spec: int | str | os.PathLike) -> Path:
        """Restore from checkpoint ``spec`` (step number, ``"latest"`` or a path).

        Weights always; with ``only_load_model`` nothing else (step 0). Otherwise also the
        optimizer, the loader position, counters and RNG states. What was restored and what not
        is in :attr:`resume_summary` (printed in the run header).

        Raises:
            CheckpointError: a missing checkpoint, another model shape, a LoRA / full mismatch,
                other LoRA settings or another pretrained base, or a checkpoint without optimizer
                or loader state (``resume_no_optimizer`` / ``load_dataloader_ckpt=false``
                continue without them).
        """
        resumed = resume_checkpoint(self, spec)
        path = resumed.path
        self._resumed, self._resumed_from, self.resume_summary = True, path, resumed.summary
        if resumed.trainer_state is not None:  # not only_load_model: this run continues that one
            self.load_state_dict(resumed.trainer_state)
            self._history, self.last_checkpoint = resumed.history, path
        if resumed.data_restored:
            self._data_iter = None  # the next batch comes from the restored position
        if self.evaluator is not None and not self.config.only_load_model:
            self.evaluator.restore(path)  # the same evaluations and best as the run that wrote it
        return path

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take over a :meth:`state_dict` (what a checkpoint's ``trainer_state.pt`` holds): the
        step, token counters and skip counts (the RNG states are the process's: :meth:`resume`
        restores them with the optimizer and the data position)."""
        self.step = int(state.get("step", 0))
        self.tokens = int(state.get("tokens", 0))
        self.task_tokens = dict(state.get("task_tokens", {}))
        self.skipped.update(state.get("skipped", {}))

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``[(step, folder), ...]`` of this run's complete checkpoints."""
        return list_checkpoints(self.config.run_dir) if self.config.run_dir is not None else []
