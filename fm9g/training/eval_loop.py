"""The Trainer's side of evaluation: building the :class:`~fm9g.training.evaluate.Evaluator` a
config asks for, running a due evaluation between steps (log, callbacks, early stopping), and the
checkpoint that ``keep_best`` must never lose.

The Trainer calls three functions: :func:`build_evaluator` once, :func:`run_evaluation` after a
step (and with ``final=True`` at the end of ``fit``), :func:`best_to_protect` when it saves.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from fm9g.training.callbacks import JsonlLogger, TensorBoardLogger
from fm9g.training.evaluate import EvalResult, Evaluator, build_eval_loaders

if TYPE_CHECKING:
    from fm9g.training.trainer import Trainer

__all__ = ["build_evaluator", "run_evaluation", "best_to_protect", "eval_autocast_dtype"]


def build_evaluator(trainer: Trainer) -> Evaluator | None:
    """The evaluator of ``trainer.config`` (None when ``eval_iters`` is 0). Its data is read on the
    first evaluation, with the run's tokenizer, rank and world size.

    Raises:
        ValueError: ``eval_iters`` is set without held-out data (``eval_split`` or ``eval_data``).
    """
    cfg = trainer.config
    if not cfg.eval_iters:
        return None
    if cfg.eval_data is None and not cfg.eval_split:
        raise ValueError("eval_iters is set but there is no held-out data: set eval_split (a share of the training "
                         "documents, e.g. 0.05) or eval_data (a dataset config of held-out data), or give the "
                         "Trainer an evaluator (trainer.evaluator = Evaluator(config, [(task_names, batches)]))")
    eng, tokenizer = trainer.engine, _tokenizer_of(trainer)

    def loaders() -> list[Any]:
        return build_eval_loaders(cfg, tokenizer(), rank=eng.rank, world_size=eng.world_size)

    def prompts() -> Any:
        from fm9g.training.evaluate import _entries
        from fm9g.training.prompts import PromptFormat

        entries = _entries(cfg, cfg.data)[0] if cfg.data is not None else None
        return PromptFormat.from_entries(tokenizer(), entries, cfg.max_length)

    return Evaluator(cfg, loaders, world_size=eng.world_size, prompts=prompts if cfg.eval_prompts else None)


def _tokenizer_of(trainer: Trainer) -> Callable[[], Any]:
    """A function giving the run's tokenizer: the trainer's (made with its data loader), else one
    built from the config on first use and kept."""
    kept: list[Any] = []

    def get() -> Any:
        if trainer.tokenizer is None and trainer.config.data is not None:
            trainer.loader  # noqa: B018 - builds the training loader, and with it the trainer's tokenizer
        if trainer.tokenizer is not None:
            return trainer.tokenizer
        if not kept:
            from fm9g.training.builders import build_tokenizer

            kept.append(build_tokenizer(trainer.config))
        return kept[0]

    return get


def eval_autocast_dtype(engine: Any) -> torch.dtype | None:
    """bf16 when the engine trains under bf16 autocast on a GPU, else None (what the model holds)."""
    return torch.bfloat16 if getattr(engine, "precision", "fp32") == "bf16" and engine.device.type == "cuda" else None


def run_evaluation(trainer: Trainer, *, final: bool = False) -> EvalResult | None:
    """Evaluate when due after ``trainer.step`` (every ``eval_iters``; ``final``: at the end too):
    log to the console, TensorBoard and train_stats, call ``on_eval`` of the callbacks, and ask
    the trainer to stop when early stopping says so. Returns the result (None when not due)."""
    ev = trainer.evaluator
    if ev is None or not ev.due(trainer.step, final=final):
        return None
    eng = trainer.engine
    model = eng.model if getattr(eng, "model", None) is not None else trainer.model
    result = ev.evaluate(model, trainer.step, device=eng.device, autocast_dtype=eval_autocast_dtype(eng),
                         all_reduce=eng.all_reduce)
    logger = trainer.logger
    if logger is not None and eng.is_main:
        logger.print(result.summary() + "".join(f"\n\tQ: {q}\n\tA: {a}" for q, a in result.answers.items()))
        if logger.writer is not None:
            TensorBoardLogger(logger.writer).on_eval(trainer, result)
        if getattr(logger, "stats_dir", None) is not None:
            JsonlLogger(logger.write_row).on_eval(trainer, result)
    trainer.callbacks.call("on_eval", trainer, result)
    if ev.stop_reason is not None:
        trainer.request_stop(ev.stop_reason, reason="early_stopping")
    return result


def best_to_protect(trainer: Trainer) -> list[Path]:
    """The checkpoint folder of the best evaluation (``keep_best``), which pruning must keep."""
    ev, run_dir = trainer.evaluator, trainer.config.run_dir
    if ev is None or not trainer.config.keep_best or ev.best_step is None or run_dir is None:
        return []
    path = Path(run_dir) / str(ev.best_step)
    return [path] if path.is_dir() else []
