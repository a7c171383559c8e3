"""Hooks for library users: a small callback protocol, and the loggers built on it.

    class StopAtLoss(Callback):
        def on_step_end(self, trainer, step, metrics, task_loss):
            if metrics["loss"] < 0.1:
                trainer.request_stop("loss below 0.1")

    Trainer(config, callbacks=[StopAtLoss(), WandbLogger(project="fm9g")]).fit()

Four events, each given the trainer (read ``trainer.step``, ``trainer.model``, ``trainer.config``;
stop the run with ``trainer.request_stop(reason)``, which saves a final checkpoint):

* ``on_step_end(trainer, step, metrics, task_loss)``: a completed optimizer step; ``metrics`` is
  the logged row (``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ...), ``task_loss`` the mean
  loss per task of the step.
* ``on_eval(trainer, result)``: an evaluation (:class:`fm9g.training.evaluate.EvalResult`).
* ``on_save(trainer, path)``: a checkpoint folder was written.
* ``on_fit_end(trainer, result)``: :meth:`Trainer.fit` returns (:class:`TrainResult`).

Callbacks run on the main rank only (the one that logs), except those with ``all_ranks = True``.
The built-in :class:`TensorBoardLogger` and :class:`JsonlLogger` write the evaluations into the
run's TensorBoard folder and ``train_stats`` jsonl (the training steps are written by
:class:`fm9g.training.metrics.MetricsLogger` itself). :class:`WandbLogger`, :class:`MLflowLogger`
and :class:`SwanLabLogger` send steps and evaluations to those services when their package is
installed (never required).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Iterable

__all__ = ["Callback", "CallbackList", "TensorBoardLogger", "JsonlLogger", "WandbLogger", "MLflowLogger",
           "SwanLabLogger", "eval_metrics"]


class Callback:
    """Base class of a callback: override the events you need (each does nothing here)."""

    all_ranks = False  # True: also called on ranks other than the main one

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any], task_loss: dict[str, float]) -> None:
        """After optimizer step ``step`` was logged."""

    def on_eval(self, trainer: Any, result: Any) -> None:
        """After an evaluation (an :class:`fm9g.training.evaluate.EvalResult`)."""

    def on_save(self, trainer: Any, path: Any) -> None:
        """After checkpoint folder ``path`` was written."""

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        """When :meth:`Trainer.fit` returns ``result``."""


class CallbackList:
    """Calls every callback of a list for an event (only the main rank's, unless ``all_ranks``)."""

    def __init__(self, callbacks: Iterable[Callback] = (), *, is_main: bool = True) -> None:
        self.callbacks = list(callbacks)
        self.is_main = is_main

    def add(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def call(self, event: str, *args: Any) -> None:
        """Run ``event`` (``"on_step_end"``, ``"on_eval"``, ``"on_save"``, ``"on_fit_end"``) on each."""
        for cb in self.callbacks:
            if self.is_main or getattr(cb, "all_ranks", False):
                getattr(cb, event)(*args)


def eval_metrics(result: Any) -> dict[str, float]:
    """An evaluation as flat scalars: ``eval/loss``, ``eval/perplexity``, ``eval/tokens``, ``eval/loss/<task>``."""
    out = {"eval/loss": result.loss, "eval/perplexity": result.perplexity, "eval/tokens": float(result.tokens)}
    out.update({f"eval/loss/{k}": v for k, v in result.task_loss.items()})
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _step_scalars(metrics: dict[str, Any], task_loss: dict[str, float]) -> dict[str, float]:
    out = {f"train/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    out.update({f"train/loss/{k}": v for k, v in task_loss.items() if math.isfinite(v)})
    return out


# ------------------------------------------------------------------------------ built-in loggers
class TensorBoardLogger(Callback):
    """Evaluations into TensorBoard: ``Loss/eval``, ``Loss/eval/<task>``, ``Eval/perplexity``,
    ``Eval/tokens`` and the ``eval_prompts`` answers as text (``Eval/answers``).

    Args:
        writer: a ``SummaryWriter`` (the run's, from :class:`MetricsLogger`).
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def on_eval(self, trainer: Any, result: Any) -> None:
        w, step = self.writer, result.step
        for tag, v in (("Loss/eval", result.loss), ("Eval/perplexity", result.perplexity), ("Eval/tokens", result.tokens)):
            if math.isfinite(v):
                w.add_scalar(tag, v, step)
        for task, v in result.task_loss.items():
            w.add_scalar(f"Loss/eval/{task}", v, step)
        if result.answers:
            text = "\n\n".join(f"**{q}**\n\n{a}" for q, a in result.answers.items())
            w.add_text("Eval/answers", text, step)
        w.flush()


class JsonlLogger(Callback):
    """Evaluations into the run's ``train_stats`` jsonl: one row per evaluation with ``"kind":
    "eval"``, ``iteration``, ``eval_loss``, ``eval_perplexity``, ``eval_tokens``,
    ``eval_loss/<task>``, ``eval_best`` and ``eval_answers``. ``fm9g plot`` and
    :func:`fm9g.training.metrics.read_train_stats` merge it into the row of its iteration.

    Args:
        write_row: writes one JSON-able dict as a line (the run's :meth:`MetricsLogger.write_row`).
    """

    def __init__(self, write_row: Any) -> None:
        self.write_row = write_row

    def on_eval(self, trainer: Any, result: Any) -> None:
        row = {"time": time.time(), "kind": "eval", "iteration": result.step, "eval_loss": result.loss,
               "eval_perplexity": result.perplexity, "eval_tokens": result.tokens, "eval_best": result.is_best}
        row.update({f"eval_loss/{k}": v for k, v in result.task_loss.items()})
        if result.answers:
            row["eval_answers"] = dict(result.answers)
        self.write_row(json.loads(json.dumps(row, default=float)))


# ------------------------------------------------------------------------------ optional services
def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed: `pip install {extra}` to use this logger") from None


class WandbLogger(Callback):
    """Steps and evaluations to Weights & Biases (``pip install wandb``; ``mode="offline"`` writes
    locally). Keyword arguments go to ``wandb.init`` (``project``, ``name``, ``mode``, ``dir``, ...)."""

    def __init__(self, **init_kwargs: Any) -> None:
        self.wandb = _require("wandb", "wandb")
        self.init_kwargs = init_kwargs
        self.run: Any = None

    def _run(self, trainer: Any) -> Any:
        if self.run is None:
            self.run = self.wandb.init(config=trainer.config.to_dict(), **self.init_kwargs)
        return self.run

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any], task_loss: dict[str, float]) -> None:
        self._run(trainer).log(_step_scalars(metrics, task_loss), step=step)

    def on_eval(self, trainer: Any, result: Any) -> None:
        self._run(trainer).log(eval_metrics(result), step=result.step)

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MLflowLogger(Callback):
    """Steps and evaluations to MLflow (``pip install mlflow``; a ``file:`` tracking URI writes
    locally). Args: ``tracking_uri``, ``experiment``, ``run_name``."""

    def __init__(self, *, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None) -> None:
        self.mlflow = _require("mlflow", "mlflow")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.active = False

    def _start(self, trainer: Any) -> None:
        if self.active:
            return
        if self.tracking_uri:
            self.mlflow.set_tracking_uri(self.tracking_uri)
        if self.experiment:
            self.mlflow.set_experiment(self.experiment)
        self.mlflow.start_run(run_name=self.run_name)
        flat = {k: str(v)[:250] for k, v in trainer.config.to_dict().items() if not isinstance(v, (list, dict))}
        self.mlflow.log_params(flat)
        self.active = True

    def _log(self, trainer: Any, values: dict[str, float], step: int) -> None:
        self._start(trainer)
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any], task_loss: dict[str, float]) -> None:
        self._log(trainer, _step_scalars(metrics, task_loss), step)

    def on_eval(self, trainer: Any, result: Any) -> None:
        self._log(trainer, eval_metrics(result), result.step)

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        if self.active:
            self.mlflow.end_run()
            self.active = False


class SwanLabLogger(Callback):
    """Steps and evaluations to SwanLab (``pip install swanlab``; ``mode="local"`` or
    ``"offline"`` writes locally). Keyword arguments go to ``swanlab.init``."""

    def __init__(self, **init_kwargs: Any) -> None:
        self.swanlab = _require("swanlab", "swanlab")
        self.init_kwargs = init_kwargs
        self.run: Any = None

    def _run(self, trainer: Any) -> Any:
        if self.run is None:
            self.run = self.swanlab.init(config=trainer.config.to_dict(), **self.init_kwargs)
        return self.run

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any], task_loss: dict[str, float]) -> None:
        self._run(trainer)
        self.swanlab.log(_step_scalars(metrics, task_loss), step=step)

    def on_eval(self, trainer: Any, result: Any) -> None:
        self._run(trainer)
        self.swanlab.log(eval_metrics(result), step=result.step)

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        if self.run is not None:
            self.swanlab.finish()
            self.run = None
