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
weights as N steps straight.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from fm9g._io import find_model_file
from fm9g.models.config import FM9GConfig
from fm9g.models.lora import apply_lora, lora_modules
from fm9g.training.checkpoint import (
    CheckpointError,
    get_rng_state,
    list_checkpoints,
    load_checkpoint,
    load_state_dict_checked,
    resolve_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from fm9g.training.config import TrainConfig
from fm9g.training.engine import Engine, StepOutput, build_engine
from fm9g.training.metrics import MetricsLogger, flops_per_token, inspect_model, mfu
from fm9g.training.schedules import lr_at

__all__ = ["Trainer", "TrainResult", "TrainingError", "build_model", "build_tokenizer", "build_loader", "pretrained_state",
           "seed_everything"]

# model-config fields that must agree between a checkpoint and the model it is loaded into
SHAPE_FIELDS = ("vocab_size", "dim_model", "num_layers", "num_heads", "num_kv_heads", "dim_head", "dim_ff",
                "tie_lm_head", "qkv_bias")


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
        stop_reason: ``"train_iters"``, ``"data_exhausted"``.
    """

    step: int
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    stop_reason: str = "train_iters"


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ builders
def _resolve_model_config(config: TrainConfig) -> FM9GConfig | None:
    """``config.model`` as an FM9GConfig (a preset name or a model JSON is read here), with the
    ``attn_impl`` switch of the TrainConfig applied; None when ``model`` is not set."""
    m = config.model
    if m is None:
        return None
    if isinstance(m, FM9GConfig):
        mc = m
    else:
        path = config.find_file(m, "model_configs")
        if path is not None and os.path.isfile(path):
            mc = FM9GConfig.from_json(path)
        else:
            try:
                mc = FM9GConfig.from_name(m)
            except Exception as err:
                raise FileNotFoundError(
                    f"model={m!r} is neither a preset name nor a model config JSON "
                    f"(looked for {m}, {m}.json and model_configs/{m}.json next to the train config): {err}"
                ) from None
    return _with_switches(mc, config)


def _with_switches(mc: FM9GConfig, config: TrainConfig) -> FM9GConfig:
    """The model config with the TrainConfig's ``attn_impl`` when that is set (else the model's own)."""
    return dataclasses.replace(mc, attn_impl=config.attn_impl) if config.attn_impl else mc


def _pretrained_path(config: TrainConfig) -> Path | None:
    """``pretrained_model`` resolved against the config's folder (None when not set)."""
    if not config.pretrained_model:
        return None
    pre = Path(config.resolve_path(config.pretrained_model))
    if not pre.exists():
        raise FileNotFoundError(f"pretrained_model {config.pretrained_model!r} does not exist")
    return pre


def _model_file(folder: Path) -> Path | None:
    """The one fm9g_live_checkpoint*.pt of a checkpoint folder (None: an HF directory)."""
    try:
        return find_model_file(folder)
    except FileExistsError as err:
        raise FileNotFoundError(f"pretrained_model folder {folder}: {err}") from None


def pretrained_state(config: TrainConfig) -> Mapping[str, torch.Tensor] | None:
    """The ``pretrained_model`` weights in the original FM9G names, without building a model.

    A ``.pt`` (or a checkpoint folder holding one) is memory-mapped
    (``torch.load(mmap=True, weights_only=True)``): tensors are read from disk when touched, so an
    engine can load them shard by shard. An HF directory is converted by
    :func:`fm9g.convert.hf.load_pretrained` (on CPU).

    Returns:
        name -> tensor, or None when ``pretrained_model`` is not set.
    """
    pre = _pretrained_path(config)
    if pre is None:
        return None
    file = _model_file(pre) if pre.is_dir() else pre
    if file is None:
        from fm9g.convert.hf import load_pretrained

        return load_pretrained(pre).state_dict()
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (pre-zip) file cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def build_model(config: TrainConfig, *, device: str | torch.device | None = None,
                load_weights: bool = True) -> nn.Module:
    """The FM9GModel the config describes, with ``pretrained_model`` weights when `load_weights`.

    ``pretrained_model`` may be a ``.pt`` in the original key names (needs ``model``), a checkpoint
    folder of ours, or a Hugging Face directory (the model config is read from it when ``model``
    is not set; when set, the shapes must agree).

    Args:
        config: the run's TrainConfig.
        device: where the parameters are created (None: CPU). ``"meta"`` with
            ``load_weights=False`` builds the structure without memory; an engine then loads
            :func:`pretrained_state` shard by shard.
        load_weights: load ``pretrained_model`` (when set).
    Returns:
        The model in train mode.
    """
    from fm9g.models.fm9g import FM9GModel

    mc = _resolve_model_config(config)
    pre = _pretrained_path(config)
    hf_dir = pre if pre is not None and pre.is_dir() and _model_file(pre) is None else None
    if load_weights and str(device) == "meta" and pre is not None:
        raise ValueError("build_model(device='meta') cannot hold weights: pass load_weights=False and load "
                         "pretrained_state(config) into the engine")
    if hf_dir is not None:
        from fm9g.convert.hf import load_hf_config, load_pretrained

        if load_weights:
            model = load_pretrained(hf_dir)
            found = model.config
        else:
            found = load_hf_config(hf_dir)
        if mc is not None:
            _check_same_shape(mc, found, f"pretrained_model {hf_dir}")
        mc = _with_switches(found, config)
        if load_weights:
            model.config = mc
            return (model.to(device) if device is not None else model).train()
    if mc is None:
        raise ValueError("TrainConfig.model is not set: give a preset name, a model JSON or an FM9GConfig "
                         "(or pretrained_model = an HF directory)")
    with torch.device(device or "cpu"):
        model = FM9GModel(mc)
    if load_weights and pre is not None and hf_dir is None:
        load_state_dict_checked(model, pretrained_state(config), source=f"pretrained_model {pre}")
    return model.train()


def build_tokenizer(config: TrainConfig) -> Any:
    """``AutoTokenizer`` from ``tokenizer_path`` (or the ``pretrained_model`` directory)."""
    path = config.tokenizer_path or (config.pretrained_model if config.pretrained_model and
                                     os.path.isdir(config.resolve_path(config.pretrained_model)) else None)
    if path is None:
        raise ValueError("tokenizer_path is not set (needed to tokenize the data)")
    path = config.resolve_path(path)
    from transformers import AutoTokenizer

    remote = os.path.isdir(path) and any(Path(path).glob("tokenization_*.py"))  # the FM9G tokenizers ship code
    return AutoTokenizer.from_pretrained(path, trust_remote_code=remote)


def build_loader(config: TrainConfig, tokenizer: Any, *, rank: int = 0, world_size: int = 1) -> Any:
    """``MixtureLoader`` for ``config.data`` (a dataset-config JSON path / name or a list)."""
    from fm9g.data.mixture import MixtureLoader

    data: Any = config.data
    if data is None:
        raise ValueError("TrainConfig.data is not set: give a dataset config JSON (dataset_config) or a list of entries")
    base_dir = None
    if isinstance(data, str):
        found = config.find_file(data, "dataset_configs")
        if found is None:
            raise FileNotFoundError(f"dataset config {data!r} not found (also looked for dataset_configs/{data}.json)")
        data = found
    else:
        base_dir = config.base_dir
    kwargs = {"base_dir": base_dir} if base_dir else {}
    return MixtureLoader.from_config(data, tokenizer, config.max_length, config.batch_size, seed=config.seed,
                                     rank=rank, world_size=world_size, num_workers=config.num_workers, **kwargs)


def _check_same_shape(a: Any, b: Any, what: str) -> None:
    da = a if isinstance(a, dict) else a.to_dict()
    db = b if isinstance(b, dict) else b.to_dict()
    diff = [f"{k}: {db.get(k)!r} in {what} vs {da.get(k)!r} in this model" for k in SHAPE_FIELDS
            if k in da and k in db and da[k] != db[k]]
    if diff:
        raise CheckpointError(f"{what} has another model shape ({'; '.join(diff)}); use the model config it was trained with")


def _has_lora(model: nn.Module) -> bool:
    """True when the model holds LoRA layers (asked of fm9g.models.lora)."""
    return next(lora_modules(model), None) is not None


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
        engine: a ready engine (default: :func:`fm9g.training.engine.build_engine`).
        log_stream: where console lines go (default stdout).
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
    ) -> None:
        self.config = config
        seed_everything(config.seed)
        if model is None and engine is not None:
            model = engine.model
        if model is None:
            dev = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            model = build_model(config, device=dev if dev.startswith("cuda") else None)
        if config.lora is not None and not _has_lora(model):
            apply_lora(model, config.lora)
        self.is_lora = _has_lora(model)
        self.model = model
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
        # rows come from the loader when one is given (it may pack other lengths than the config)
        self.batch_size = int(getattr(loader, "batch_size", None) or config.batch_size)
        self.max_length = int(getattr(loader, "max_length", None) or config.max_length)
        self.flops_per_token = flops_per_token(self.model, self.max_length)
        self.logger: MetricsLogger | None = None

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
        return (
            f"fm9g train: {total / 1e6:,.2f}M parameters, {trainable / 1e6:,.2f}M trainable"
            f"{' (LoRA)' if self.is_lora else ''}; {where}\n"
            f"  {c.train_iters} iterations of {c.grad_accum} x {self.batch_size} x {self.max_length} tokens; "
            f"lr {c.lr:g} {c.lr_scheduler} (warmup {c.warmup_steps:g}, drop {c.drop_steps:g}); "
            f"starting after step {self.step}; checkpoints: {c.run_dir or 'off'}"
        )

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: list[dict[str, Any]]) -> StepOutput:
        """The Trainer's half of iteration ``self.step + 1`` over ``batches`` (grad_accum micro-batches).

        The engine runs forward / backward / clip / update (:meth:`Engine.train_step`); here: the
        learning rate of the iteration, the out-of-memory skip (``ignore_cuda_oom``), the skip
        bookkeeping and the counters. A skipped step leaves ``self.step`` unchanged.

        Returns:
            The engine's :class:`StepOutput` (global figures).
        """
        k = self.step + 1
        try:
            out = self.engine.train_step(batches, self.lr_at(k))
        except torch.cuda.OutOfMemoryError:
            if not self.config.ignore_cuda_oom:
                raise
            self.engine.zero_grad()
            torch.cuda.empty_cache()
            out = StepOutput(loss=float("nan"), num_label_tokens=0, num_tokens=0, skipped="oom")
        if out.skipped:
            self.skipped[out.skipped] = self.skipped.get(out.skipped, 0) + 1
            self.bad_in_row += 1
            return out
        self.bad_in_row = 0
        self.step = k
        self.tokens += out.num_tokens  # already the count over every rank
        names = self.task_names(batches[0])
        for tid, n in out.task_tokens.items():
            name = names[tid] if tid < len(names) else str(tid)
            self.task_tokens[name] = self.task_tokens.get(name, 0) + n
        return out

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """Train until ``train_iters`` (or the data ends when ``stop_when_end`` is False).

        Returns:
            :class:`TrainResult`. Raises :class:`TrainingError` after ``max_bad_steps``
            consecutive skipped steps, naming the reason.
        """
        cfg = self.config
        if cfg.resume_ckpt is not None and not self._resumed:
            self.resume(cfg.resume_ckpt)
        if self._data_iter is None:
            self._data_iter = iter(self.loader)
        self.logger = logger = self._open_logger()
        result = TrainResult(step=self.step)
        logger.print(self.describe())
        if self.step == 0 and cfg.inspect_iters:
            logger.print(inspect_model(self.model))
        t_prev = time.perf_counter()
        try:
            while not cfg.stop_when_end or self.step < cfg.train_iters:
                batches = self._next_batches()
                if batches is None:
                    result.stop_reason = "data_exhausted"
                    logger.print(f"data ran out after iteration {self.step}; stopping"
                                 + (f" (train_iters={cfg.train_iters})" if cfg.stop_when_end else ""))
                    break
                t0 = time.perf_counter()
                out = self.train_step(batches)
                now = time.perf_counter()
                times, t_prev = (now - t_prev, now - t0), now
                if out.skipped:
                    self._report_skip(out)
                    continue
                result.losses.append(out.loss)
                logger.log(self.step, self._metrics_row(out, batches, *times), self._task_losses(out, batches))
                if cfg.inspect_iters and self.step % cfg.inspect_iters == 0:
                    logger.print(inspect_model(self.model))
                self._maybe_save()
            self._maybe_save(final=True)
        finally:
            logger.close()
        result.step, result.tokens, result.skipped = self.step, self.tokens, dict(self.skipped)
        result.last_checkpoint = self.last_checkpoint
        return result

    # ------------------------------------------------------------------ pieces of the loop
    def _open_logger(self) -> MetricsLogger:
        """The run's logger; TensorBoard and train_stats folders resolved from the config
        (``"auto"``: inside the run folder). Only the main rank writes."""
        cfg, run_dir = self.config, self.config.run_dir

        def folder(value: str | None, auto: str) -> Path | None:
            if value is None or (value == "auto" and run_dir is None):
                return None
            return run_dir / auto if value == "auto" else Path(cfg.resolve_path(value))

        stats = folder(cfg.stats_dir, "train_stats") if run_dir is not None else None
        return MetricsLogger(
            total_steps=cfg.train_iters, start_step=self.step, tensorboard_dir=folder(cfg.tensorboard, "tensorboard"),
            stats_dir=stats, log_iters=cfg.log_iters, progress_bar=cfg.progress_bar, enabled=self.engine.is_main,
            stream=self.log_stream,
        )

    def _next_batches(self) -> list[dict[str, Any]] | None:
        """The next ``grad_accum`` micro-batches, or None when the data ran out first."""
        assert self._data_iter is not None
        batches = []
        for _ in range(self.config.grad_accum):
            try:
                batches.append(next(self._data_iter))
            except StopIteration:
                return None
        return batches

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
        mem = self.engine.memory_stats()
        if mem:
            row["mem_gb"], row["peak_mem_gb"] = mem["allocated"], mem["peak"]
        return row

    def _task_losses(self, out: StepOutput, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Mean loss per task name of a step (empty unless ``log_task_loss``)."""
        if not self.config.log_task_loss:
            return {}
        names = self.task_names(batches[0])
        return {(names[tid] if tid < len(names) else str(tid)): s / out.task_label_tokens[tid]
                for tid, s in out.task_loss_sum.items() if out.task_label_tokens.get(tid, 0)}

    def _maybe_save(self, *, final: bool = False) -> None:
        """Save every ``save_iters`` steps, and at the end (``save_final``) unless this step is saved."""
        cfg = self.config
        if cfg.run_dir is None:
            return
        if final:
            due = cfg.save_final and self.step > 0 and (
                self.last_checkpoint is None or self.last_checkpoint.name != str(self.step))
        else:
            due = bool(cfg.save_iters) and self.step % cfg.save_iters == 0
        if due:
            self.save()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Trainer state: step, counters, RNG states, whether this is a LoRA run."""
        return {
            "step": self.step, "tokens": self.tokens, "task_tokens": dict(self.task_tokens),
            "skipped": dict(self.skipped), "rng": get_rng_state(), "is_lora": self.is_lora,
            "seed": self.config.seed,
        }

    def save(self) -> Path:
        """Write checkpoint ``<save>/<model_unique>/<step>/`` (atomically) and return its folder."""
        cfg = self.config
        run_dir = cfg.run_dir
        if run_dir is None:
            raise ValueError("save is null: set `save` to a directory to write checkpoints")
        loader = self._loader
        loader_state = loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None
        mc = getattr(self.model, "config", None)
        path = save_checkpoint(
            run_dir, self.step,
            model_state=self.engine.model_state_dict(lora_only=self.is_lora),
            optimizer_state=self.engine.optimizer_state_dict(),
            loader_state=loader_state,
            trainer_state=self.state_dict(),
            model_config=mc.to_dict() if hasattr(mc, "to_dict") else None,
            train_config=cfg.to_dict(),
            keep_last=cfg.keep_last,
            rank=self.engine.rank,
        )
        self.last_checkpoint = path
        if self.logger is not None:
            self.logger.print(f"saved checkpoint {path}")
        return path

    def resume(self, spec: int | str | os.PathLike) -> Path:
        """Restore from checkpoint ``spec`` (step number, ``"latest"`` or a path).

        Weights always; with ``only_load_model`` nothing else (step 0). Otherwise also the
        optimizer, the loader position (when ``load_dataloader_ckpt``), counters and RNG states.
        Raises :class:`CheckpointError` for a missing checkpoint, another model shape, or a
        LoRA / full mismatch.
        """
        cfg = self.config
        path = resolve_checkpoint(cfg.run_dir, spec)
        ck = load_checkpoint(path, rank=self.engine.rank, weights_only_model=cfg.only_load_model)
        mc = getattr(self.model, "config", None)
        if ck.model_config and mc is not None and hasattr(mc, "to_dict"):
            _check_same_shape(mc, ck.model_config, f"checkpoint {path}")
        ck_lora = bool(ck.trainer_state.get("is_lora", False))
        if ck_lora != self.is_lora:
            raise CheckpointError(
                f"checkpoint {path} was written by a {'LoRA' if ck_lora else 'full'} run but this run is "
                f"{'LoRA' if self.is_lora else 'full'} training; "
                + ("set the same lora settings (lora_r, lora_alpha, lora_layer)" if ck_lora else "remove lora from the config, or start a new run (model_unique)")
            )
        try:
            self.engine.load_model_state_dict(ck.model_state, lora_only=self.is_lora)
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path}: {err}") from None
        self._resumed = True
        if cfg.only_load_model:
            return path
        if ck.optimizer_state:
            self.engine.load_optimizer_state_dict(ck.optimizer_state)
        if ck.loader_state is not None and cfg.load_dataloader_ckpt:
            loader = self.loader
            if hasattr(loader, "load_state_dict"):
                loader.load_state_dict(ck.loader_state)
            self._data_iter = None
        ts = ck.trainer_state
        self.step = int(ts.get("step", ck.step))
        self.tokens = int(ts.get("tokens", 0))
        self.task_tokens = dict(ts.get("task_tokens", {}))
        self.skipped.update(ts.get("skipped", {}))
        if "rng" in ts:
            set_rng_state(ts["rng"])
        self.last_checkpoint = path
        return path

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``[(step, folder), ...]`` of this run's complete checkpoints."""
        return list_checkpoints(self.config.run_dir) if self.config.run_dir is not None else []
