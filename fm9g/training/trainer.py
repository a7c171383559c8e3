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
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from fm9g.training.checkpoint import (
    CheckpointError,
    get_rng_state,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from fm9g.training.config import TrainConfig
from fm9g.training.engine import Engine, StepOutput, build_engine, load_state_dict_checked
from fm9g.training.metrics import MetricsLogger, flops_per_token, inspect_model, mfu
from fm9g.training.schedules import lr_at

__all__ = ["Trainer", "TrainResult", "TrainingError", "build_model", "build_tokenizer", "build_loader", "seed_everything"]

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
def _resolve_model_config(config: TrainConfig) -> Any:
    from fm9g.models.config import FM9GConfig

    m = config.model
    if m is None:
        return None
    if isinstance(m, FM9GConfig):
        mc = m
    elif isinstance(m, dict):
        mc = FM9GConfig.from_dict(m, source="TrainConfig.model")
    else:
        s = str(m)
        path = config.find_file(s, "model_configs")
        if path is not None and os.path.isfile(path):
            mc = FM9GConfig.from_json(path)
        else:
            try:
                mc = FM9GConfig.from_name(s)
            except Exception as err:
                raise FileNotFoundError(
                    f"model={s!r} is neither a preset name nor a model config JSON "
                    f"(looked for {s}, {s}.json and model_configs/{s}.json next to the train config): {err}"
                ) from None
    if config.attn_impl:
        mc = dataclasses.replace(mc, attn_impl=config.attn_impl)
    return mc


def build_model(config: TrainConfig, *, device: str | torch.device | None = None) -> nn.Module:
    """The FM9GModel the config describes, with ``pretrained_model`` weights if set.

    ``pretrained_model`` may be a ``.pt`` in the original key names (needs ``model``), a checkpoint
    folder of ours, or a Hugging Face directory (the model config is read from it when ``model``
    is not set; when set, the shapes must agree).
    """
    from fm9g.models.fm9g import FM9GModel

    mc = _resolve_model_config(config)
    pre = config.resolve_path(config.pretrained_model) if config.pretrained_model else None
    if pre is not None and not os.path.exists(pre):
        raise FileNotFoundError(f"pretrained_model {config.pretrained_model!r} does not exist")
    if pre is not None and os.path.isdir(pre) and not list(Path(pre).glob("fm9g_live_checkpoint*.pt")):
        from fm9g.convert.hf import load_pretrained

        model = load_pretrained(pre)
        if mc is not None:
            _check_same_shape(mc, model.config, f"pretrained_model {pre}")
            if config.attn_impl:
                model.config = dataclasses.replace(model.config, attn_impl=config.attn_impl)
        if device is not None:
            model = model.to(device)
        return model.train()
    if mc is None:
        raise ValueError("TrainConfig.model is not set: give a preset name, a model JSON or an FM9GConfig "
                         "(or pretrained_model = an HF directory)")
    with torch.device(device or "cpu"):
        model = FM9GModel(mc)
    if pre is not None:
        p = Path(pre)
        if p.is_dir():
            pts = sorted(p.glob("fm9g_live_checkpoint*.pt"))
            if len(pts) != 1:
                raise FileNotFoundError(f"pretrained_model folder {p} must hold exactly one fm9g_live_checkpoint*.pt, found {len(pts)}")
            p = pts[0]
        state = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        load_state_dict_checked(model, state, source=f"pretrained_model {p}")
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

    data = config.data
    if data is None:
        raise ValueError("TrainConfig.data is not set: give a dataset config JSON (dataset_config) or a list of entries")
    base_dir = None
    if isinstance(data, (str, os.PathLike)):
        found = config.find_file(str(data), "dataset_configs")
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
    return any(n.endswith("lora_A") for n, _ in model.named_parameters())


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
        if model is None and engine is None and config.engine == "torch" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torchrun: the FSDP2 engine builds the model on the meta device and loads each rank's shard
            engine = build_engine(config, None, lora_only=config.lora is not None)
        if model is None and engine is not None:
            model = engine.model
        if model is None:
            dev = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            model = build_model(config, device=dev if dev.startswith("cuda") else None)
        if config.lora is not None and not _has_lora(model):
            from fm9g.models.lora import LoraConfig, apply_lora

            lcfg = config.lora if isinstance(config.lora, LoraConfig) else LoraConfig.from_dict(config.lora)
            apply_lora(model, lcfg)
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
        where = f"{eng.name} engine on {getattr(eng, 'device', '?')}, precision {getattr(eng, 'precision', '?')}"
        return (
            f"fm9g train: {total / 1e6:,.2f}M parameters, {trainable / 1e6:,.2f}M trainable"
            f"{' (LoRA)' if self.is_lora else ''}; {where}\n"
            f"  {c.train_iters} iterations of {c.grad_accum} x {self.batch_size} x {self.max_length} tokens; "
            f"lr {c.lr:g} {c.lr_scheduler} (warmup {c.warmup_steps:g}, drop {c.drop_steps:g}); "
            f"starting after step {self.step}; checkpoints: {c.run_dir or 'off'}"
        )

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: list[dict[str, Any]]) -> StepOutput:
        """One optimizer step (iteration ``self.step + 1``) over ``batches`` (grad_accum micro-batches).

        Updates the counters; a skipped step (non-finite, or OOM with ``ignore_cuda_oom``) leaves
        ``self.step`` unchanged. Returns the engine's :class:`StepOutput`.
        """
        k = self.step + 1
        lr = self.lr_at(k)
        try:
            out = self.engine.train_step(batches, lr)
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
        self.tokens += out.num_tokens  # StepOutput figures are global (summed over the ranks)
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
        loader = self.loader
        if self._data_iter is None:
            self._data_iter = iter(loader)
        main = self.engine.is_main
        run_dir = cfg.run_dir
        tb = stats = None
        if run_dir is not None:
            tb = None if cfg.tensorboard is None else (run_dir / "tensorboard" if cfg.tensorboard == "auto" else Path(cfg.resolve_path(cfg.tensorboard)))
            stats = None if cfg.stats_dir is None else (run_dir / "train_stats" if cfg.stats_dir == "auto" else Path(cfg.resolve_path(cfg.stats_dir)))
        elif cfg.tensorboard not in (None, "auto"):
            tb = Path(cfg.resolve_path(cfg.tensorboard))
        self.logger = logger = MetricsLogger(
            total_steps=cfg.train_iters, start_step=self.step, tensorboard_dir=tb, stats_dir=stats,
            log_iters=cfg.log_iters, progress_bar=cfg.progress_bar, enabled=main, stream=self.log_stream,
        )
        peak = self.engine.peak_flops()
        result = TrainResult(step=self.step)
        logger.print(self.describe())
        if self.step == 0 and cfg.inspect_iters:
            logger.print(inspect_model(self.model))
        t_prev = time.perf_counter()
        try:
            while not cfg.stop_when_end or self.step < cfg.train_iters:
                batches = []
                for _ in range(cfg.grad_accum):
                    try:
                        batches.append(next(self._data_iter))
                    except StopIteration:
                        break
                if len(batches) < cfg.grad_accum:
                    result.stop_reason = "data_exhausted"
                    logger.print(f"data ran out after iteration {self.step}; stopping"
                                 + (f" (train_iters={cfg.train_iters})" if cfg.stop_when_end else ""))
                    break
                t0 = time.perf_counter()
                out = self.train_step(batches)
                now = time.perf_counter()
                model_time, iter_time, t_prev = now - t0, now - t_prev, now
                if out.skipped:
                    logger.print(f"iteration {self.step + 1}: batch skipped ({'loss or gradient not finite' if out.skipped == 'nonfinite' else 'CUDA out of memory'}); "
                                 f"{self.bad_in_row} in a row, {sum(self.skipped.values())} in total")
                    if self.bad_in_row >= cfg.max_bad_steps:
                        raise TrainingError(
                            f"{self.bad_in_row} consecutive steps were skipped ({out.skipped}) at iteration {self.step + 1}; "
                            "stopping. Lower lr, check the data, or resume from an earlier checkpoint "
                            f"(max_bad_steps={cfg.max_bad_steps})"
                        )
                    continue
                result.losses.append(out.loss)
                tps = out.num_tokens / max(iter_time, 1e-9)
                mem = self.engine.memory_stats()
                names = self.task_names(batches[0])
                task_loss = {}
                if cfg.log_task_loss:
                    for tid, s in out.task_loss_sum.items():
                        n = out.task_label_tokens.get(tid, 0)
                        if n:
                            task_loss[names[tid] if tid < len(names) else str(tid)] = s / n
                row = {
                    "loss": out.loss, "lr": self.lr_at(self.step), "grad_norm": out.grad_norm,
                    "tokens_per_s": tps, "mfu": mfu(tps / self.engine.world_size, self.flops_per_token, peak),
                    "iter_time": iter_time, "model_time": model_time, "token_pass": self.tokens,
                    "num_tokens": out.num_tokens, "num_label_tokens": out.num_label_tokens,
                    "mask_max": out.num_label_tokens / max(1, sum(int(b["labels"].numel()) for b in batches)),
                }
                if mem:
                    row["mem_gb"], row["peak_mem_gb"] = mem["allocated"], mem["peak"]
                logger.log(self.step, row, task_loss)
                if cfg.inspect_iters and self.step % cfg.inspect_iters == 0:
                    logger.print(inspect_model(self.model))
                if run_dir is not None and cfg.save_iters and self.step % cfg.save_iters == 0:
                    self.save()
            if run_dir is not None and cfg.save_final and self.step > 0 and (
                self.last_checkpoint is None or self.last_checkpoint.name != str(self.step)
            ):
                self.save()
        finally:
            logger.close()
        result.step = self.step
        result.tokens = self.tokens
        result.skipped = dict(self.skipped)
        result.last_checkpoint = self.last_checkpoint
        return result

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
        # checkpoint_format "sharded" (several ranks): model + optimizer go to <step>/dcp/ instead
        sharded = self.engine.world_size > 1 and cfg.checkpoint_format == "sharded"
        shared = dict(
            model_state={} if sharded else self.engine.model_state_dict(lora_only=self.is_lora),
            optimizer_state={"world_size": self.engine.world_size} if sharded else self.engine.optimizer_state_dict(),
            loader_state=loader_state,
            trainer_state=self.state_dict(),
            model_config=mc.to_dict() if hasattr(mc, "to_dict") else None,
            train_config=cfg.to_dict(),
            keep_last=cfg.keep_last,
        )
        if self.engine.world_size > 1:  # several ranks write into one folder (see docs/distributed.md)
            from fm9g.training.distributed import save_checkpoint_ranks

            path = save_checkpoint_ranks(run_dir, self.step, rank=self.engine.rank, world_size=self.engine.world_size,
                                         barrier=self.engine.barrier,
                                         sharded_writer=getattr(self.engine, "save_sharded") if sharded else None,
                                         **shared)
        else:
            path = save_checkpoint(run_dir, self.step, rank=self.engine.rank, **shared)
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
        sharded = (Path(path) / "dcp").is_dir()  # checkpoint_format "sharded": model + optimizer in dcp/
        if sharded and not hasattr(self.engine, "load_sharded"):
            raise CheckpointError(f"checkpoint {path} is sharded (dcp/): resume it under torchrun (2 or more processes)")
        try:
            if sharded:
                self.engine.load_sharded(Path(path) / "dcp", model_only=cfg.only_load_model)
            else:
                self.engine.load_model_state_dict(ck.model_state, lora_only=self.is_lora)
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path}: {err}") from None
        self._resumed = True
        if cfg.only_load_model:
            return path
        saved_world = int((ck.optimizer_state or {}).get("world_size", 1))
        if sharded and saved_world != self.engine.world_size and not cfg.load_dataloader_ckpt:
            pass  # dcp re-shards model + optimizer; the data order starts fresh (load_dataloader_ckpt=false)
        elif saved_world != self.engine.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {saved_world} process(es) but this run has {self.engine.world_size}: "
                "the optimizer and data-loader states are per rank, so an exact resume needs the same number of "
                "processes. Resume with the same world size, or set only_load_model=true (weights only; fresh "
                "optimizer, data order and step 0)"
                + (", or load_dataloader_ckpt=false (this sharded checkpoint re-shards the model and optimizer; "
                   "the data order starts fresh)" if sharded else "") + " - see docs/distributed.md"
            )
        if ck.optimizer_state and not sharded:
            self.engine.load_optimizer_state_dict(ck.optimizer_state)
        if self.engine.world_size > 1 and cfg.load_dataloader_ckpt:
            from fm9g.training.distributed import load_loader_state

            ck.loader_state = load_loader_state(path, self.engine.rank, self.engine.world_size)
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
