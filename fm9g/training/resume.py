"""Resuming a run from a checkpoint (what :meth:`fm9g.training.trainer.Trainer.resume` does).

:func:`resume` resolves and loads the checkpoint, checks that it fits this run (model shape, LoRA
or full, LoRA settings and base, world size, optimizer and loader state present), loads the
weights and, unless ``only_load_model``, the optimizer, the data position, the counters and the
RNG states. What was restored and what not goes to ``trainer.resume_summary`` (the run header).
The rules are in docs/checkpoints.md; resuming on another number of processes in docs/distributed.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fm9g.training.builders import check_same_shape
from fm9g.training.checkpoint import (
    SHARDED_DIR,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_loader_states,
    optimizer_file,
    read_lineage,
    resolve_checkpoint,
    saved_world_size,
    set_rng_state,
)
from fm9g.training.run_checks import lora_settings

if TYPE_CHECKING:
    from fm9g.training.trainer import Trainer

__all__ = ["resume", "Resumed"]


@dataclass(frozen=True)
class Resumed:
    """What :func:`resume` restored, for the Trainer to take over (it owns its fields).

    Attributes:
        path: the checkpoint folder.
        summary: the run header's account of what was restored and what not.
        trainer_state: the checkpoint's Trainer state (step, counters, RNG; see
            :meth:`Trainer.load_state_dict`), None with ``only_load_model`` (a new run at step 0).
        history: the checkpoint lineage the run continues.
        data_restored: the loader's position was restored (the Trainer restarts its iterator).
    """

    path: Path
    summary: str
    trainer_state: dict[str, Any] | None
    history: tuple[tuple[str, int], ...] = ()
    data_restored: bool = False


def resume(trainer: Trainer, spec: int | str | os.PathLike) -> Resumed:
    """Load checkpoint ``spec`` (step number, ``"latest"`` or a path) into `trainer`'s engine and
    loader, after checking that it fits the run; the Trainer takes over the returned values.

    Weights always; with ``only_load_model`` nothing else (a new run at step 0). Otherwise also the
    optimizer, the loader position and the RNG states; the step and counters come back in
    :attr:`Resumed.trainer_state`.

    Raises:
        CheckpointError: see :meth:`fm9g.training.trainer.Trainer.resume`.
    """
    cfg = trainer.config
    path = resolve_checkpoint(cfg.run_dir, spec)
    ck = load_checkpoint(path, rank=trainer.engine.rank, weights_only_model=cfg.only_load_model)
    _check_same_kind(trainer, ck, path)
    sharded = (Path(path) / SHARDED_DIR).is_dir()  # checkpoint_format "sharded": model + optimizer in dcp/
    if sharded and getattr(trainer.engine, "mesh", None) is None:
        raise CheckpointError(f"checkpoint {path} is sharded (dcp/): resume it under FSDP2 (torchrun, or "
                              "data_parallel: \"fsdp\" in one process)")
    notes = check_lora_resume(trainer, ck) if trainer.is_lora else []
    loader = None if cfg.only_load_model else check_resumable(trainer, ck, sharded)
    _load_weights(trainer, ck, path, sharded)
    if cfg.only_load_model:  # a new run (new lineage) from these weights
        return Resumed(path, f"loaded the weights of {path} (only_load_model): a new run from step 0 with a fresh "
                             "optimizer, data position and RNG", None)
    restored, missing = restore_run_state(trainer, ck, loader, sharded)
    notes += _world_notes(trainer, ck, sharded, loader)
    summary = (f"resumed from {path}: restored {', '.join(['weights'] + restored)}"
               + (f"; NOT restored: {'; '.join(missing)}" if missing else "; exact resume")
               + "".join(f"; {n}" for n in notes))
    state = dict(ck.trainer_state)
    state.setdefault("step", ck.step)
    return Resumed(path, summary, state, read_lineage(path).chain, data_restored=loader is not None)


def _check_same_kind(trainer: Trainer, ck: Checkpoint, path: Path) -> None:
    """The checkpoint's model shape and its LoRA / full kind must be this run's."""
    mc = getattr(trainer.model, "config", None)
    if ck.model_config and mc is not None and hasattr(mc, "to_dict"):
        check_same_shape(mc, ck.model_config, f"checkpoint {path}")
    ck_lora = bool(ck.trainer_state.get("is_lora", False))
    if ck_lora != trainer.is_lora:
        raise CheckpointError(
            f"checkpoint {path} was written by a {'LoRA' if ck_lora else 'full'} run but this run is "
            f"{'LoRA' if trainer.is_lora else 'full'} training; "
            + ("set the same lora settings (lora_r, lora_alpha, lora_layer)" if ck_lora
               else "remove lora from the config, or start a new run (model_unique)")
        )


def _load_weights(trainer: Trainer, ck: Checkpoint, path: Path, sharded: bool) -> None:
    """Load the checkpoint's weights into the engine (from ``dcp/`` when sharded, with the optimizer
    unless ``only_load_model``); a mismatch is a :class:`CheckpointError` naming the folder."""
    try:
        if sharded:
            trainer.engine.load_sharded(Path(path) / SHARDED_DIR, model_only=trainer.config.only_load_model)
        else:
            trainer.engine.load_model_state_dict(ck.model_state, lora_only=trainer.is_lora)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None


def restore_run_state(trainer: Trainer, ck: Checkpoint, loader: Any, sharded: bool) -> tuple[list[str], list[str]]:
    """Optimizer, data position (into `loader`, None: skipped) and RNG from `ck`; returns what was
    restored and what was not, for the run header (the counters are the Trainer's to load)."""
    restored, missing = [], []
    if trainer.config.resume_no_optimizer:
        missing.append("optimizer (resume_no_optimizer: fresh AdamW moments)")
    elif sharded:  # loaded with the model from dcp/ (re-sharded to this world size)
        restored.append("optimizer")
    else:
        trainer.engine.load_optimizer_state_dict(ck.optimizer_state)
        restored.append("optimizer")
    if loader is not None:
        loader.load_state_dict(load_loader_states(ck.path) if _merges_rank_states(loader) else ck.loader_state)
        restored.append("data position")
        if not getattr(loader, "resume_exact", True):
            missing.append(f"the grouping of the data into steps ({loader.resume_note})")
    else:
        missing.append("data position (load_dataloader_ckpt=false: the data starts from the beginning)")
    ts = ck.trainer_state
    restored.append(f"step {int(ts.get('step', ck.step))} and token counters")
    if "rng" in ts:
        set_rng_state(ts["rng"])
        restored.append("RNG")
    else:
        missing.append("RNG (not in the checkpoint)")
    return restored, missing


def check_resumable(trainer: Trainer, ck: Checkpoint, sharded: bool) -> Any:
    """Refuse a partial resume the config does not allow, or one on another number of processes
    that cannot be exact (docs/distributed.md); returns the loader to restore (or None)."""
    cfg = trainer.config
    saved_world, world = saved_world_size(ck.path), trainer.engine.world_size
    if saved_world != world and not sharded and not cfg.resume_no_optimizer:
        raise CheckpointError(
            f"checkpoint {ck.path} was written by {saved_world} process(es) but this run has {world}, and its "
            f"optimizer state is one file per process ({optimizer_file(ck.step, 0)}, ...), which fits only "
            f"{saved_world} process(es). Resume with {saved_world} process(es); or set resume_no_optimizer=true "
            "(weights, data position and step; fresh AdamW moments) or only_load_model=true (weights only; fresh "
            "optimizer, data order and step 0). To move a run to another number of processes with its optimizer, "
            "save it with checkpoint_format=\"sharded\" (torchrun, several processes): that format re-shards the "
            "model and optimizer to any number - see docs/distributed.md")
    if not cfg.resume_no_optimizer and not sharded and not ck.optimizer_state:
        raise CheckpointError(
            f"checkpoint {ck.path} holds no optimizer state ({ck.path.name}/"
            f"{optimizer_file(ck.step, trainer.engine.rank)} is missing or empty), so the resume "
            "would not be exact; set resume_no_optimizer=true to continue with a fresh optimizer")
    if not cfg.load_dataloader_ckpt:
        return None
    loader = trainer.loader
    if not hasattr(loader, "load_state_dict"):
        raise CheckpointError(
            f"this run's loader ({type(loader).__name__}) has no load_state_dict(), so the data position of "
            f"checkpoint {ck.path} cannot be restored; set load_dataloader_ckpt=false to start the data "
            "from the beginning")
    if saved_world != world and not _merges_rank_states(loader):
        raise CheckpointError(
            f"checkpoint {ck.path} was written by {saved_world} process(es) but this run has {world}, and this "
            f"run's loader ({type(loader).__name__}) restores one state per process; resume with {saved_world} "
            "process(es), or set load_dataloader_ckpt=false to start the data from the beginning")
    if ck.loader_state is None and not (_merges_rank_states(loader) and load_loader_states(ck.path)):
        raise CheckpointError(
            f"checkpoint {ck.path} holds no data loader state (dataset_ckpt/loader_state.pt is missing or "
            "empty), so the data would start from the beginning; set load_dataloader_ckpt=false to accept that")
    return loader


def _merges_rank_states(loader: Any) -> bool:
    """The loader's ``load_state_dict`` takes the list of every rank's state (the global data
    position of :class:`~fm9g.data.mixture.MixtureLoader`), on any number of processes."""
    return bool(getattr(loader, "loads_every_rank_state", False))


def _world_notes(trainer: Trainer, ck: Checkpoint, sharded: bool, loader: Any) -> list[str]:
    """The run header's notes on a resume on another number of processes, and on the data."""
    notes = []
    saved_world, world = saved_world_size(ck.path), trainer.engine.world_size
    if saved_world != world:
        what = "weights and optimizer re-sharded" if sharded else "weights loaded"
        notes.append(f"{what} from {saved_world} to {world} process(es)")
    note = getattr(loader, "resume_note", None) if loader is not None else None
    if note and getattr(loader, "resume_exact", True):
        notes.append(note)
    return notes


def _norm(value: Any) -> Any:
    """Numbers compare as floats, lists as lists (a checkpoint's values went through JSON-able types)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return list(value) if isinstance(value, (list, tuple)) else value


def check_lora_resume(trainer: Trainer, ck: Checkpoint) -> list[str]:
    """LoRA settings and pretrained base must be the checkpoint's; returns notes for the log."""
    saved, mine = ck.trainer_state.get("lora"), lora_settings(trainer.model)
    notes = []
    if saved is None:
        notes.append("the checkpoint does not record its LoRA settings or base (older version): not checked")
    else:
        diff = [f"{k}: {saved.get(k)!r} in the checkpoint vs {mine[k]!r} here" for k in ("r", "alpha", "target_modules")
                if _norm(saved.get(k)) != _norm(mine[k])]
        if diff:
            raise CheckpointError(
                f"checkpoint {ck.path} was trained with other LoRA settings ({'; '.join(diff)}); set lora_r, "
                "lora_alpha and lora_layer to the checkpoint's, or start a new run (model_unique)")
    base, here = ck.trainer_state.get("pretrained") or {}, trainer._base_identity or {}
    if base.get("fingerprint") and here.get("fingerprint") and base["fingerprint"] != here["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {ck.path} holds LoRA tensors trained on another base model (pretrained_model "
            f"{base.get('path')!r} then, {here.get('path')!r} now: their weights differ); set pretrained_model "
            "to the base the LoRA was trained on")
    return notes
