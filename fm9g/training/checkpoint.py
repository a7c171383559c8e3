"""Training checkpoints: atomic save, listing, resolving ``resume_ckpt`` and loading.

Layout of one checkpoint (``<save>/<model_unique>/<step>/``, the original's layout)::

    fm9g_live_checkpoint-<step>.pt           model state dict in the original key names
                                             (LoRA runs: only the LoRA tensors)
    fm9g_live_checkpoint-<step>.rank-0.opt   optimizer state (one file per rank: .rank-<r>.opt)
    fm9g_live_checkpoint-<step>.log_ckpt     JSON {iteration, global_token_pass, global_total_task_token}
    trainer_state.pt                         step, token counters, RNG states (tensors / plain types)
    dataset_ckpt/loader_state.pt             the data loader's state_dict() (rank r > 0: loader_state.rank-<r>.pt)
    config.json                              the model config (FM9GConfig.to_dict())
    train_config.json                        the TrainConfig of the run

Lineage: ``trainer_state.pt`` also records where the checkpoint's state comes from (:class:`Lineage`:
its id, the ``(id, step)`` of the checkpoints it descends from, and a write serial). A save moves
every checkpoint of the run folder that is not in the new checkpoint's history into
``<run>/abandoned/<step>-<time>/`` (a branch left by resuming from an earlier step), prunes only
older checkpoints of its own history (``keep_last``; never the one just written nor a protected
one), and ``latest`` is the checkpoint written last. docs/checkpoints.md states the rules.

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
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fm9g._io import CHECKPOINT_NAME, atomic_dir, explain_disk_full, state_dict_mismatch
from fm9g.convert.files import load_checkpoint_file

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "CheckpointError",
    "Lineage",
    "read_lineage",
    "latest_checkpoint",
    "best_checkpoint",
    "all_finite",
    "save_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "load_checkpoint",
    "load_loader_states",
    "saved_world_size",
    "model_file",
    "optimizer_file",
    "to_safe",
    "from_safe",
    "get_rng_state",
    "set_rng_state",
    "load_state_dict_checked",
]

TRAINER_STATE = "trainer_state.pt"
LOADER_STATE = os.path.join("dataset_ckpt", "loader_state.pt")
ABANDONED = "abandoned"  # <run>/abandoned/<step>-<time>/: checkpoints of a branch left behind
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read, or does not fit the model."""


def model_file(step: int) -> str:
    """File name of the model weights of ``step``: ``fm9g_live_checkpoint-<step>.pt``."""
    return f"{CHECKPOINT_NAME}-{step}.pt"


def optimizer_file(step: int, rank: int = 0) -> str:
    """File name of rank `rank`'s optimizer state of ``step``: ``fm9g_live_checkpoint-<step>.rank-<rank>.opt``."""
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


# ------------------------------------------------------------------------------ lineage
@dataclass(frozen=True, kw_only=True)
class Lineage:
    """Where the state of a checkpoint comes from (stored in its ``trainer_state.pt``).

    Attributes:
        id: the checkpoint's unique id (``"legacy-<step>"`` for one written without a record:
            such checkpoints of a folder count as one lineage, ordered by step).
        step: its step.
        ancestors: ``(id, step)`` of the checkpoints its state descends from, oldest first (a
            resumed run inherits the history of the checkpoint it resumed from).
        serial: write order: the time of writing in ns, or one more than the largest serial in
            the run folder if that is larger (so a clock set back never reorders checkpoints); 0
            for a checkpoint without a record (older than any with one).
    """

    id: str
    step: int
    ancestors: tuple[tuple[str, int], ...] = ()
    serial: int = 0

    @property
    def chain(self) -> tuple[tuple[str, int], ...]:
        """The history a state restored from this checkpoint continues: ancestors, then itself."""
        return self.ancestors + ((self.id, self.step),)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "step": self.step, "ancestors": [list(a) for a in self.ancestors],
                "serial": self.serial, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Lineage":
        return cls(id=str(d["id"]), step=int(d["step"]), serial=int(d.get("serial", 0)),
                   ancestors=tuple((str(i), int(s)) for i, s in d.get("ancestors", ())))


def _recorded_lineage(path: Path) -> Lineage | None:
    """The lineage record of a complete checkpoint folder (None: written without one)."""
    try:
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file
        raise CheckpointError(f"cannot read {path / TRAINER_STATE}: {err}") from err
    rec = state.get("lineage") if isinstance(state, dict) else None
    return Lineage.from_dict(rec) if isinstance(rec, dict) else None


def _lineages(run_dir: Path) -> dict[Path, Lineage]:
    """Lineage of every complete checkpoint of a run folder; checkpoints without a record form one
    chain by step (``legacy-<step>`` ids, serial 0)."""
    found = {path: _recorded_lineage(path) for _, path in list_checkpoints(run_dir)}
    legacy = sorted(int(p.name) for p, lin in found.items() if lin is None)
    out: dict[Path, Lineage] = {}
    for path, lin in found.items():
        if lin is None:
            step = int(path.name)
            lin = Lineage(id=f"legacy-{step}", step=step,
                          ancestors=tuple((f"legacy-{s}", s) for s in legacy if s < step))
        out[path] = lin
    return out


def read_lineage(path: str | os.PathLike) -> Lineage:
    """The :class:`Lineage` of a checkpoint folder (a synthetic ``legacy-<step>`` one when it has no record)."""
    p = Path(path)
    lin = _recorded_lineage(p)
    return lin if lin is not None else _lineages(p.parent)[p]


def _newest(lineages: Mapping[Path, Lineage]) -> Path | None:
    """The checkpoint written last: highest serial, then highest step."""
    return max(lineages, key=lambda p: (lineages[p].serial, lineages[p].step), default=None)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``latest``: the checkpoint of `run_dir` written last (the tip of the current lineage), or None."""
    return _newest(_lineages(Path(run_dir)))


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``best``: the checkpoint of the lowest eval loss that ``latest`` records in its trainer state
    (``evaluation.best_step``; ``keep_best`` keeps it through pruning), or None."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    state = torch.load(latest / TRAINER_STATE, map_location="cpu", weights_only=True)
    step = (state.get("evaluation") or {}).get("best_step") if isinstance(state, dict) else None
    path = Path(run_dir) / str(step)
    return path if step is not None and _is_complete(path) else None


def _move_aside(run_dir: Path, path: Path) -> Path:
    """Move a checkpoint of an abandoned branch to ``<run>/abandoned/<step>-<UTC time>[-n]/``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest_root = run_dir / ABANDONED
    dest_root.mkdir(exist_ok=True)
    dest, n = dest_root / f"{path.name}-{stamp}", 1
    while dest.exists():
        dest, n = dest_root / f"{path.name}-{stamp}-{n}", n + 1
    os.replace(path, dest)
    return dest


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no element of `tensors` is inf or NaN: one fused max-abs reduction per device
    and dtype (``torch._foreach_norm(ord=inf)``, no overflow for large finite values) and one
    host sync in all."""
    groups: dict[tuple[torch.device, torch.dtype, type], list[torch.Tensor]] = {}
    for t in tensors:  # FSDP2's DTensors apart from the plain tensors every rank keeps whole
        if t.numel() and t.is_floating_point():
            groups.setdefault((t.device, t.dtype, type(t.detach())), []).append(t.detach())
    if not groups:
        return True
    with torch.no_grad():
        maxima = [torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all() for ts in groups.values()]
        return bool(torch.stack([m.to(maxima[0].device) for m in maxima]).all())


# ------------------------------------------------------------------------------ writing
def _write_file(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write one file of a checkpoint and fsync it; a full disk or a size limit is a
    :class:`~fm9g._io.DiskFullError` naming the file. (Tests monkeypatch this to inject faults.)"""
    with explain_disk_full(path), open(path, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
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


def loader_state_file(rank: int = 0) -> str:
    """Where rank ``rank`` keeps its loader state inside a checkpoint folder (rank 0: the one-process name)."""
    return LOADER_STATE if rank == 0 else os.path.join("dataset_ckpt", f"loader_state.rank-{rank}.pt")


SHARDED_DIR = "dcp"  # inside a checkpoint folder: the torch.distributed.checkpoint shards (checkpoint_format "sharded")


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
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    sharded_writer: Callable[[Path], None] | None = None,
    history: Sequence[tuple[str, int]] | None = None,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write checkpoint ``step`` under ``run_dir`` atomically; prune to ``keep_last`` afterwards.

    First every checkpoint of ``run_dir`` outside the new one's history moves to
    ``<run>/abandoned/<step>-<time>/`` (a branch left by a resume from an earlier step; never
    deleted); ``keep_last`` then deletes only older checkpoints of that history.

    With several ranks (a collective, with ``barrier``) every rank writes its optimizer file
    (``*.rank-<r>.opt``) and loader state into one temporary folder all ranks see; rank 0 then writes
    the shared files (model ``.pt``, trainer state, configs) and renames the folder, as one process
    does. With ``sharded_writer`` (``checkpoint_format: "sharded"``) every rank writes its model and
    optimizer shards into ``<step>/dcp/`` (``torch.distributed.checkpoint``), and no ``.pt``.

    Args:
        run_dir: ``<save>/<model_unique>``.
        step: iteration number (the folder name).
        model_state: state dict in the original names (full model, or the LoRA tensors; used on rank 0).
        optimizer_state: this rank's ``optimizer.state_dict()``.
        loader_state: this rank's ``loader.state_dict()`` (numpy arrays allowed).
        trainer_state: step, counters, RNG (see :func:`get_rng_state`); plain types and tensors.
        model_config / train_config: JSON-able dicts.
        keep_last: keep only the newest N checkpoints of this history (None keeps all).
        rank / world_size / barrier: the data-parallel position and a barrier across the ranks.
        sharded_writer: ``f(folder)`` writing this rank's model and optimizer shards (collective).
        history: ``(id, step)`` of the checkpoints the state descends from (:attr:`Lineage.chain`;
            ``()`` for a fresh run; None: continue the folder's ``latest`` up to ``step``).
        protect: checkpoint folders that pruning never deletes (the one the run resumed from).
    Returns:
        The final checkpoint folder ``run_dir/<step>``.
    """
    run_dir = Path(run_dir)
    sync = barrier or (lambda: None)
    own_files: list[tuple[str, Callable[[Any], None], bool]] = [
        (optimizer_file(step, rank), lambda f: torch.save(to_safe(optimizer_state or {}), f), True),
        (loader_state_file(rank), lambda f: torch.save(to_safe(loader_state), f), True),
    ]
    tmp = _shared_tmp_for_ranks(run_dir, step, rank, sync, own_files, sharded_writer) if world_size > 1 else None
    if rank == 0:
        shared = _shared_files_of(step, model_state if sharded_writer is None else None, trainer_state,
                                  model_config, train_config)
        _write_on_main(run_dir, step, own_files, shared, tmp, history, keep_last, protect)
    sync()
    return run_dir / str(step)


def _shared_files_of(step: int, model_state: dict[str, torch.Tensor] | None, trainer_state: dict[str, Any] | None,
                     model_config: dict[str, Any] | None, train_config: dict[str, Any] | None
                     ) -> Callable[[Lineage], list[tuple[str, Callable[[Any], None], bool]]]:
    """The files only the main rank writes, once the checkpoint's lineage is known."""
    return lambda lineage: _shared_files(step, lineage, model_state, trainer_state, model_config, train_config)


def _write_on_main(run_dir: Path, step: int, own_files: list[tuple[str, Callable[[Any], None], bool]],
                   shared: Callable[[Lineage], list[tuple[str, Callable[[Any], None], bool]]], tmp: Path | None,
                   history: Sequence[tuple[str, int]] | None, keep_last: int | None,
                   protect: Iterable[str | os.PathLike]) -> None:
    """The main rank's part of :func:`save_checkpoint`: the lineage, other branches moved aside, the
    folder committed (renamed into place), then pruning to ``keep_last``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        _remove_stale(run_dir)
    existing = _lineages(run_dir)
    lineage = _new_lineage(existing, step, history)
    final = run_dir / str(step)
    mine = {i for i, _ in lineage.ancestors}
    for path, lin in existing.items():
        if lin.id not in mine:  # another branch (a same-step folder of it included): keep it aside
            _move_aside(run_dir, path)
    _commit(final, step, own_files + shared(lineage), tmp)
    _fsync_dir(run_dir)
    if keep_last is not None:
        _prune(existing, mine, final, keep_last, {Path(p).resolve() for p in protect})


def _shared_tmp_for_ranks(run_dir: Path, step: int, rank: int, sync: Callable[[], None],
                          own_files: list[tuple[str, Callable[[Any], None], bool]],
                          sharded_writer: Callable[[Path], None] | None) -> Path:
    """Several ranks: rank 0 makes one temporary folder (named the same on every rank), then every
    rank writes its shards (``sharded_writer``) and every rank but 0 its own files into it
    (rank 0 writes its own with the shared files); returns the folder once all ranks are done."""
    tmp = run_dir / f".tmp-{step}-ranks"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale(run_dir)
        (tmp / "dataset_ckpt").mkdir(parents=True)
    sync()
    if sharded_writer is not None:
        sharded_writer(tmp / SHARDED_DIR)
    if rank != 0:
        for name, write, binary in own_files:
            _write_file(tmp / name, write, binary)
    sync()
    return tmp


def _new_lineage(existing: Mapping[Path, Lineage], step: int, history: Sequence[tuple[str, int]] | None) -> Lineage:
    """The lineage of the checkpoint about to be written: a new id, `history` as its ancestors (None:
    the history of the folder's ``latest`` up to `step`) and a serial above every one in the folder."""
    if history is None:
        newest = _newest(existing)
        history = [a for a in existing[newest].chain if a[1] < step] if newest is not None else []
    return Lineage(id=uuid.uuid4().hex, step=step, ancestors=tuple((str(i), int(s)) for i, s in history),
                   serial=max(time.time_ns(), 1 + max((lin.serial for lin in existing.values()), default=0)))


def _commit(final: Path, step: int, files: list[tuple[str, Callable[[Any], None], bool]], tmp: Path | None) -> None:
    """Write `files` and rename the folder to `final` atomically: into the ranks' shared `tmp`
    folder (which then takes the place of the new one), or into a fresh one (one process)."""
    if tmp is not None:
        _write_all(tmp, files)
        with atomic_dir(final, tmp_prefix=f".tmp-{step}-{os.getpid()}-") as empty:
            empty.rmdir()
            os.replace(tmp, empty)
    else:
        with atomic_dir(final, tmp_prefix=f".tmp-{step}-{os.getpid()}-") as new:
            (new / "dataset_ckpt").mkdir()
            _write_all(new, files)


def _remove_stale(run_dir: Path) -> None:
    for stale in run_dir.glob(".tmp-*"):  # leftovers of a crashed save: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)


def _shared_files(step: int, lineage: "Lineage", model_state: dict[str, torch.Tensor] | None,
                  trainer_state: dict[str, Any] | None, model_config: dict[str, Any] | None,
                  train_config: dict[str, Any] | None) -> list[tuple[str, Callable[[Any], None], bool]]:
    """The files rank 0 writes (model weights unless sharded, logs, configs, trainer state last)."""
    trainer_state = dict(trainer_state or {})
    trainer_state.setdefault("step", step)
    trainer_state["format_version"] = FORMAT_VERSION
    trainer_state["lineage"] = lineage.to_dict()
    log_ckpt = {
        "iteration": step,
        "global_token_pass": int(trainer_state.get("tokens", 0)),
        "global_total_task_token": dict(trainer_state.get("task_tokens", {})),
    }
    files: list[tuple[str, Callable[[Any], None], bool]] = []
    if model_state is not None:
        files.append((model_file(step), lambda f: torch.save(model_state, f), True))
    files += [
        (f"{CHECKPOINT_NAME}-{step}.log_ckpt", lambda f: json.dump(log_ckpt, f), False),
        ("config.json", lambda f: json.dump(model_config or {}, f, indent=2, default=str), False),
        ("train_config.json", lambda f: json.dump(train_config or {}, f, indent=2, default=str), False),
        # written last: its presence marks a complete folder even before the rename
        (TRAINER_STATE, lambda f: torch.save(to_safe(trainer_state), f), True),
    ]
    return files


def _write_all(folder: Path, files: list[tuple[str, Callable[[Any], None], bool]]) -> None:
    for name, write, binary in files:
        _write_file(folder / name, write, binary)
    _fsync_dir(folder)


def _prune(existing: Mapping[Path, Lineage], history_ids: set[str], written: Path, keep_last: int,
           protected: set[Path]) -> None:
    """Delete older checkpoints of the written one's history beyond the newest ``keep_last``
    (the written one counts); never the written one nor a protected one."""
    older = sorted((lin.step, path) for path, lin in existing.items()
                   if lin.id in history_ids and path != written and path.is_dir())
    for _, path in older[:max(0, len(older) - (keep_last - 1))]:
        if path.resolve() not in protected:
            # renamed first: a kill in the middle never leaves a half-deleted folder that looks complete
            trash = path.parent / f".tmp-pruned-{path.name}-{os.getpid()}"
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------ finding
def _is_complete(path: Path) -> bool:
    try:
        step = int(path.name)
    except ValueError:
        return False
    model = (path / model_file(step)).is_file() or (path / SHARDED_DIR / ".metadata").is_file()
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
        spec: a step number (``5`` or ``"5"``), ``"latest"`` (the checkpoint written last: the tip
            of the current lineage, see :func:`latest_checkpoint`), ``"best"`` (:func:`best_checkpoint`), a checkpoint folder, or the
            ``.pt`` file inside one.
    Raises:
        CheckpointError: nothing matches (the message lists what exists).
    """
    s = str(spec).strip()
    available = list_checkpoints(run_dir) if run_dir is not None else []
    if s.lower() == "latest":
        latest = latest_checkpoint(run_dir) if available else None
        if latest is None:
            raise CheckpointError(f"resume_ckpt='latest' but {run_dir} holds no complete checkpoint")
        return latest
    if s.lower() == "best":
        best = best_checkpoint(run_dir) if available else None
        if best is None:
            raise CheckpointError(f"resume_ckpt='best' but {run_dir} records no best checkpoint (keep_best with eval_iters)")
        return best
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
        return load_checkpoint_file(p / name, map_location=map_location, mmap=False, error=CheckpointError)

    # a sharded checkpoint (dcp/, written by several ranks) has no gathered .pt: the engine loads dcp/
    model_state = _load(model_file(step)) if (p / model_file(step)).is_file() else {}
    trainer_state = from_safe(_load(TRAINER_STATE))
    opt = loader = None
    if not weights_only_model:
        if (p / optimizer_file(step, rank)).is_file():
            opt = from_safe(_load(optimizer_file(step, rank)))
        if (p / loader_state_file(rank)).is_file():
            loader = from_safe(_load(loader_state_file(rank)))

    def _json(name: str) -> dict[str, Any]:
        f = p / name
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    return Checkpoint(
        path=p, step=step, model_state=model_state, optimizer_state=opt, loader_state=loader,
        trainer_state=trainer_state, model_config=_json("config.json"), train_config=_json("train_config.json"),
    )


def saved_world_size(path: str | os.PathLike) -> int:
    """How many processes wrote checkpoint folder ``path``: its optimizer files ``*.rank-<r>.opt``
    (one per rank, in the default and the sharded format; 1 when there is none)."""
    p = Path(path)
    step = int(p.name)
    n = 0
    while (p / optimizer_file(step, n)).is_file():
        n += 1
    return max(n, 1)


def load_loader_states(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> list[Any]:
    """The loader state of every rank that wrote checkpoint folder ``path``, in rank order (the
    ranks whose file is missing are left out; ``[]`` when none has one). A
    :class:`~fm9g.data.mixture.MixtureLoader` merges them into the global data position."""
    p = Path(path)
    out = []
    for rank in range(saved_world_size(p)):
        f = p / loader_state_file(rank)
        if f.is_file():
            out.append(from_safe(load_checkpoint_file(f, map_location=map_location, mmap=False, error=CheckpointError)))
    return out


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
