"""Training checkpoints: atomic save, listing, resolving ``resume_ckpt`` and loading.

Layout of one checkpoint (``<save>/<model_unique>/<step>/``, the original's layout)::

    fm9g_live_checkpoint-<step>.pt           model state dict in the original key names
                                             (LoRA runs: only the LoRA tensors)
    fm9g_live_checkpoint-<step>.rank-0.opt   optimizer state
    fm9g_live_checkpoint-<step>.log_ckpt     JSON {iteration, global_token_pass, global_total_task_token}
    trainer_state.pt                         step, token counters, RNG states (tensors / plain types)
    dataset_ckpt/loader_state.pt             the data loader's state_dict()
    config.json                              the model config (FM9GConfig.to_dict())
    train_config.json                        the TrainConfig of the run

Crash safety: every file is written (and fsynced) into ``<run>/.tmp-<step>-<pid>-*/`` and the folder is
renamed to ``<run>/<step>`` only when all files are on disk (``fm9g._io.atomic_dir``; ``os.replace``
is atomic on POSIX). A crash in the
middle leaves the previous checkpoints untouched and a ``.tmp-*`` folder that is never picked up
(it is deleted by the next save). Only folders whose name is a number and which hold the
``.pt`` and ``trainer_state.pt`` files count as checkpoints.

Everything is loaded with ``torch.load(..., weights_only=True)``: numpy arrays inside loader or RNG
state are stored as tagged byte tensors (:func:`to_safe` / :func:`from_safe`).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from fm9g._io import CHECKPOINT_NAME, atomic_dir, state_dict_mismatch

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "CheckpointError",
    "save_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "load_checkpoint",
    "model_file",
    "to_safe",
    "from_safe",
    "get_rng_state",
    "set_rng_state",
    "load_state_dict_checked",
]

TRAINER_STATE = "trainer_state.pt"
LOADER_STATE = os.path.join("dataset_ckpt", "loader_state.pt")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read, or does not fit the model."""


def model_file(step: int) -> str:
    """File name of the model weights of ``step``: ``fm9g_live_checkpoint-<step>.pt``."""
    return f"{CHECKPOINT_NAME}-{step}.pt"


def optimizer_file(step: int, rank: int = 0) -> str:
    return f"{CHECKPOINT_NAME}-{step}.rank-{rank}.opt"


# ------------------------------------------------------------------------------ safe objects
def to_safe(obj: Any) -> Any:
    """Make ``obj`` loadable with ``weights_only=True``: numpy arrays -> tagged uint8 tensors,
    numpy scalars -> Python numbers; dicts / lists / tuples recursively."""
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        data = torch.frombuffer(bytearray(arr.tobytes()), dtype=torch.uint8) if arr.nbytes else torch.empty(0, dtype=torch.uint8)
        return {"__ndarray__": data, "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_safe(v) for v in obj)
    return obj


def from_safe(obj: Any) -> Any:
    """Inverse of :func:`to_safe`."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj and set(obj) == {"__ndarray__", "dtype", "shape"}:
            raw = obj["__ndarray__"].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_safe(v) for v in obj)
    return obj


def get_rng_state() -> dict[str, Any]:
    """RNG states of python ``random``, numpy, torch CPU and every CUDA device (safe types)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": to_safe(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(from_safe(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------ writing
def _write_file(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write one file of a checkpoint and fsync it. (Tests monkeypatch this to inject faults.)"""
    with open(path, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None = None,
    loader_state: Any = None,
    trainer_state: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    keep_last: int | None = None,
    rank: int = 0,
) -> Path:
    """Write checkpoint ``step`` under ``run_dir`` atomically; prune to ``keep_last`` afterwards.

    Args:
        run_dir: ``<save>/<model_unique>``.
        step: iteration number (the folder name).
        model_state: state dict in the original names (full model, or the LoRA tensors).
        optimizer_state: ``optimizer.state_dict()``.
        loader_state: ``loader.state_dict()`` (numpy arrays allowed).
        trainer_state: step, counters, RNG (see :func:`get_rng_state`); plain types and tensors.
        model_config / train_config: JSON-able dicts.
        keep_last: keep only the newest N checkpoints (None keeps all).
    Returns:
        The final checkpoint folder ``run_dir/<step>``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".tmp-*"):  # leftovers of a crashed save: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    trainer_state = dict(trainer_state or {})
    trainer_state.setdefault("step", step)
    trainer_state["format_version"] = FORMAT_VERSION
    log_ckpt = {
        "iteration": step,
        "global_token_pass": int(trainer_state.get("tokens", 0)),
        "global_total_task_token": dict(trainer_state.get("task_tokens", {})),
    }
    files: list[tuple[str, Callable[[Any], None], bool]] = [
        (model_file(step), lambda f: torch.save(model_state, f), True),
        (optimizer_file(step, rank), lambda f: torch.save(to_safe(optimizer_state or {}), f), True),
        (LOADER_STATE, lambda f: torch.save(to_safe(loader_state), f), True),
        (f"{CHECKPOINT_NAME}-{step}.log_ckpt", lambda f: json.dump(log_ckpt, f), False),
        ("config.json", lambda f: json.dump(model_config or {}, f, indent=2, default=str), False),
        ("train_config.json", lambda f: json.dump(train_config or {}, f, indent=2, default=str), False),
        # written last: its presence marks a complete folder even before the rename
        (TRAINER_STATE, lambda f: torch.save(to_safe(trainer_state), f), True),
    ]
    final = run_dir / str(step)
    with atomic_dir(final, tmp_prefix=f".tmp-{step}-{os.getpid()}-") as tmp:
        (tmp / "dataset_ckpt").mkdir()
        for name, write, binary in files:
            _write_file(tmp / name, write, binary)
        _fsync_dir(tmp)
    _fsync_dir(run_dir)
    if keep_last is not None:
        for _, old_path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old_path, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------ finding
def _is_complete(path: Path) -> bool:
    try:
        step = int(path.name)
    except ValueError:
        return False
    model = (path / model_file(step)).is_file() or (path / "dcp" / ".metadata").is_file()  # dcp: sharded format
    return model and (path / TRAINER_STATE).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, sorted by step: ``[(step, folder), ...]``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        if p.is_dir() and re.fullmatch(r"-?\d+", p.name) and _is_complete(p):
            out.append((int(p.name), p))
    return sorted(out)


def resolve_checkpoint(run_dir: str | os.PathLike | None, spec: int | str | os.PathLike) -> Path:
    """Find the checkpoint folder meant by ``resume_ckpt``.

    Args:
        run_dir: ``<save>/<model_unique>`` (may be None when ``spec`` is a path).
        spec: a step number (``5`` or ``"5"``), ``"latest"``, a checkpoint folder, or the ``.pt``
            file inside one.
    Raises:
        CheckpointError: nothing matches (the message lists what exists).
    """
    s = str(spec).strip()
    available = list_checkpoints(run_dir) if run_dir is not None else []
    if s.lower() == "latest":
        if not available:
            raise CheckpointError(f"resume_ckpt='latest' but {run_dir} holds no complete checkpoint")
        return available[-1][1]
    if re.fullmatch(r"-?\d+", s):
        for step, path in available:
            if step == int(s):
                return path
        steps = [st for st, _ in available]
        raise CheckpointError(
            f"resume_ckpt={s}: no complete checkpoint {s} in {run_dir} (available steps: {steps or 'none'})"
        )
    p = Path(os.path.expanduser(s))
    if p.is_file() and p.suffix == ".pt":
        p = p.parent
    if p.is_dir() and _is_complete(p):
        return p
    raise CheckpointError(
        f"resume_ckpt={s!r} is not a step number, 'latest' or a complete checkpoint folder "
        f"(one holding {CHECKPOINT_NAME}-<step>.pt and {TRAINER_STATE})"
    )


@dataclass(kw_only=True)
class Checkpoint:
    """A loaded checkpoint. ``model_state`` is in the original key names."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    loader_state: Any
    trainer_state: dict[str, Any]
    model_config: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", rank: int = 0,
                    weights_only_model: bool = False) -> Checkpoint:
    """Load a checkpoint folder written by :func:`save_checkpoint` (``weights_only=True``).

    Args:
        path: the checkpoint folder (or its ``.pt`` file).
        map_location: where tensors go.
        rank: whose optimizer file to read.
        weights_only_model: read only the model weights and configs (skip optimizer/loader).
    """
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not _is_complete(p):
        raise CheckpointError(f"{p} is not a complete checkpoint folder")
    step = int(p.name)

    def _load(name: str) -> Any:
        try:
            return torch.load(p / name, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - name the file
            raise CheckpointError(f"cannot read {p / name}: {err}") from err

    # a sharded checkpoint (dcp/, written by several ranks) has no gathered .pt: the engine loads dcp/
    model_state = _load(model_file(step)) if (p / model_file(step)).is_file() else {}
    trainer_state = from_safe(_load(TRAINER_STATE))
    opt = loader = None
    if not weights_only_model:
        if (p / optimizer_file(step, rank)).is_file():
            opt = from_safe(_load(optimizer_file(step, rank)))
        if (p / LOADER_STATE).is_file():
            loader = from_safe(_load(LOADER_STATE))

    def _json(name: str) -> dict[str, Any]:
        f = p / name
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    return Checkpoint(
        path=p, step=step, model_state=model_state, optimizer_state=opt, loader_state=loader,
        trainer_state=trainer_state, model_config=_json("config.json"), train_config=_json("train_config.json"),
    )


def load_state_dict_checked(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """``model.load_state_dict(state, strict=True)`` with an error naming the keys and shapes.

    Raises:
        ValueError: names or shapes differ (the message lists them and says what to check).
    """
    problem = state_dict_mismatch(model.state_dict(), dict(state), source=source)
    if problem:
        raise ValueError(
            f"the {source} does not fit the model ({problem}); check that the model config "
            "(dims, layers, vocab, tie_lm_head, qkv_bias) is the one the weights were trained with"
        )
    model.load_state_dict(state, strict=True)
