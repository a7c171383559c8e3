"""Checks before training starts, and the facts they rest on.

Each check is a :class:`~fm9g._io.ConfigError` that says what to do: a CUDA device on a machine
without CUDA (:func:`check_device`, before anything is built), LoRA on a random base, a tokenizer
larger than the model's vocabulary, and a run folder that holds another run (``overwrite_run``;
docs/training.md, "Run folders"). Also here: the identity of a LoRA run's frozen base
(:func:`base_identity`, checked on resume) and the run header's account of a fresh start.

The functions take the :class:`~fm9g.training.trainer.Trainer` whose run they check.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fm9g._io import ConfigError
from fm9g.models.lora import get_lora_config, lora_modules
from fm9g.training.checkpoint import list_checkpoints
from fm9g.training.config import TrainConfig

if TYPE_CHECKING:
    from fm9g.training.trainer import Trainer

__all__ = ["check_device", "has_lora", "lora_settings", "base_identity", "check_start", "fresh_start_text"]


def check_device(spec: str) -> None:
    """Refuse a CUDA device on a machine without CUDA, in one line (before anything is built).

    Raises:
        ConfigError: ``device`` names CUDA but ``torch.cuda.is_available()`` is False.
    """
    if spec.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"device={spec!r} but CUDA is not available ({why}); set device: 'cpu' or 'auto'")


def has_lora(model: nn.Module) -> bool:
    """True when the model holds LoRA layers (asked of fm9g.models.lora)."""
    return next(lora_modules(model), None) is not None


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """The model's LoRA r / alpha / dropout / target_modules (as JSON-able values)."""
    lc = get_lora_config(model)
    return lc.to_dict() if lc is not None else {}


def base_identity(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    """Identity of a LoRA run's frozen base: the ``pretrained_model`` path and a SHA-256 over the
    names, shapes and first 4096 values (as fp32) of four of its frozen tensors (None on meta)."""
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    path = str(Path(config.resolve_path(config.pretrained_model)).resolve()) if config.pretrained_model else None
    if not frozen or any(p.device.type == "meta" for _, p in frozen):
        return {"path": path, "fingerprint": None}
    picks = sorted({0, len(frozen) // 3, 2 * len(frozen) // 3, len(frozen) - 1})
    h = hashlib.sha256()
    with torch.no_grad():
        for i in picks:
            name, p = frozen[i]
            h.update(f"{name}{tuple(p.shape)}".encode())
            t = p.detach()
            if hasattr(t, "full_tensor"):  # a DTensor shard (FSDP2): every rank gathers the same tensor
                t = t.full_tensor()
            h.update(t.reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return {"path": path, "fingerprint": h.hexdigest()}


def fresh_start_text(trainer: Trainer) -> str:
    """The header's account of a run that resumed nothing: where the weights come from."""
    c = trainer.config
    if not trainer._model_from_config:
        weights = "the weights of the model passed to the Trainer"
    elif c.pretrained_model:
        weights = f"weights from pretrained_model {c.pretrained_model}"
    else:
        weights = "randomly initialised weights (no pretrained_model)"
    if trainer.is_lora:
        weights = f"LoRA (freshly initialised) on {weights}"
    return f"{weights}; fresh optimizer; data from the start; step 0"


def check_start(trainer: Trainer) -> None:
    """Checks before the first step, each a :class:`ConfigError` that says what to do: LoRA on a
    random base, a tokenizer larger than the model's vocabulary, and a run folder that holds
    another run (see :func:`check_run_folder`)."""
    cfg = trainer.config
    if trainer.is_lora and trainer._model_from_config and not cfg.pretrained_model and not cfg.lora_random_base:
        raise ConfigError(
            "LoRA is on but pretrained_model is not set, so LoRA would train on a randomly initialised base: "
            "set pretrained_model to the base weights (a .pt, a checkpoint folder or an HF directory), or set "
            "lora_random_base: true if that is what you want")
    check_run_folder(trainer)
    check_vocab(trainer)


def check_vocab(trainer: Trainer) -> None:
    """The tokenizer's ids must fit the model's embedding (else an IndexError in the middle of fit)."""
    loader = trainer.loader  # builds the default tokenizer and loader when none was given
    tok = trainer.tokenizer if trainer.tokenizer is not None else getattr(loader, "tokenizer", None)
    vocab = getattr(getattr(trainer.model, "config", None), "vocab_size", None)
    try:
        n_tok = len(tok) if tok is not None else None
    except TypeError:
        n_tok = None
    if n_tok is not None and vocab is not None and n_tok > vocab:
        where = f" ({trainer.config.tokenizer_path})" if trainer.config.tokenizer_path else ""
        raise ConfigError(
            f"the tokenizer{where} has {n_tok} tokens but the model's vocab_size is {vocab}: token ids >= {vocab} "
            "would fail in the middle of training; use the model's own tokenizer, or a model config with "
            f"vocab_size >= {n_tok}")


def check_run_folder(trainer: Trainer) -> None:
    """A run that starts at step 0 (no resume, or ``only_load_model``) must not write over the
    checkpoints of another run in its folder (a folder with train stats but no checkpoint holds
    no run to keep: the new run starts there, saying so): it stops with a message naming
    the options, unless ``overwrite_run`` (then that run's checkpoints, train stats and
    TensorBoard events are deleted first). A real resume continues its run and is not checked."""
    cfg, run_dir = trainer.config, trainer.config.run_dir
    if run_dir is None or trainer.step > 0 or (trainer._resumed and not cfg.only_load_model):
        return  # no folder, or this Trainer continues its own run / the run it resumed
    checkpoints = [p for _, p in list_checkpoints(run_dir)]
    stats = trainer._log_folder(cfg.stats_dir, "train_stats")
    stat_files = sorted(stats.glob("*.jsonl")) if stats is not None and stats.is_dir() else []
    if not checkpoints and not (stat_files and cfg.overwrite_run):
        if stat_files and trainer.engine.is_main:  # a run stopped before its first checkpoint: not a run to keep
            print(f"{run_dir} holds train stats but no checkpoint (a run that stopped before its first save): "
                  "starting a new run there; its rows follow the earlier ones in train_stats", file=trainer.log_stream)
        return
    if cfg.overwrite_run:
        _overwrite_run(trainer, checkpoints, stat_files)
        return
    found = (f"checkpoints {[p.name for p in checkpoints]}" if checkpoints else "no checkpoint") + (
        f" and train stats ({stats})" if stat_files else "")
    if trainer._resumed:
        start = (f"only_load_model is true, so this is a NEW run starting at step 0 from the weights of "
                 f"checkpoint {cfg.resume_ckpt}; its checkpoints would overwrite the run in {run_dir} ({found}). ")
        fix = ("To continue that run set only_load_model: false (restores optimizer, data position and step); "
               "to start a new run from those weights choose another model_unique (or save) folder; ")
    else:
        start = f"{run_dir} already holds a run ({found}) and this run starts at step 0 without resuming it. "
        fix = ("To continue it set resume_ckpt: \"latest\"; " if checkpoints else "") + (
            "to start a separate run choose another model_unique (or save) folder; ")
    raise ConfigError(start + fix + "or set overwrite_run: true to delete the earlier run's checkpoints and "
                      "train stats first")


def _overwrite_run(trainer: Trainer, checkpoints: list[Path], stat_files: list[Path]) -> None:
    """``overwrite_run``: the main rank deletes the earlier run's checkpoints, train stats and
    TensorBoard events (and says so); every rank waits for it."""
    if trainer.engine.is_main:
        tb = trainer._log_folder(trainer.config.tensorboard, "tensorboard")
        events = sorted(tb.glob("events.out.tfevents.*")) if tb is not None and tb.is_dir() else []
        for p in checkpoints:
            shutil.rmtree(p)
        for f in stat_files + events:
            f.unlink()
        print(f"overwrite_run: deleted {len(checkpoints)} checkpoint(s), {len(stat_files)} train_stats file(s) "
              f"and {len(events)} TensorBoard file(s) of the earlier run in {trainer.config.run_dir}",
              file=trainer.log_stream)
    trainer.engine.barrier()
