"""The state of a :class:`fm9g.data.mixture.MixtureLoader`: its layout (written here once), packing
it into a few tensors, and checking that a saved state fits a loader.

A state is a dict of tensors and plain values (``torch.load(..., weights_only=True)`` reads it):
the settings it was saved with (``format``, ``seed``, ``rank``, ``world_size``, ``max_length``,
``batch_size``, ``sampler``, ``task_names``, ``nlines``), then the :class:`Position`: per dataset
(Long[D] / Bool[D]) the epoch, shard index, window, counters and the drop-out flag; the mixer's
step; the packer's waiting rows as flat tensors; ``waiting`` Long[n, 2] = ``(task id, line id)`` of
the samples in the packer. See docs/mixture.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["STATE_FORMAT", "MixtureStateError", "Position", "StateSettings", "check_compatible"]

STATE_FORMAT = "fm9g.mixture/1"


class MixtureStateError(ValueError):
    """A loader state cannot be loaded into this loader (different datasets, ranks or settings)."""


@dataclass(frozen=True, kw_only=True)
class StateSettings:
    """The settings a state records and a loader must match to load it."""

    seed: int
    rank: int
    world_size: int
    max_length: int
    batch_size: int
    sampler: str
    task_names: list[str]
    nlines: list[int]


# per-dataset lists of the position, in state order; initial value of each entry
_PER_DATASET = {
    "epoch": 0, "next_line": 0, "cur_window": -1, "epoch_samples": 0, "exhausted": False, "mix_tokens": 0,
    "mix_samples": 0, "out_tokens": 0, "out_samples": 0, "out_label_tokens": 0, "dropped_lines": 0,
}


@dataclass(kw_only=True)
class Position:
    """Where a mixture stands after the last batch handed out (lists have one entry per dataset).

    Attributes:
        epoch: current pass over this rank's shard (0-based).
        next_line: next shard index to read in this epoch.
        cur_window: next window of the (long) line being handed out; -1 when none is.
        epoch_samples: samples handed out in this epoch.
        exhausted: the dataset dropped out.
        mix_tokens / mix_samples: tokens and samples drawn by the mixer.
        out_tokens / out_samples / out_label_tokens: real tokens, packed sequences and labelled
            tokens in the batches handed out.
        dropped_lines: lines read but skipped (transform returned None, empty output, ...).
        drop_reasons: per dataset, those lines counted by reason (:class:`fm9g.data.tokenize.Dropped`).
        step: the mixer's step counter (its random numbers are a function of ``(seed, rank, step)``).
        batches: batches handed out.
        finished: every dataset dropped out and the last batch was handed out.
        packer: :meth:`fm9g.data.packing.Packer.state_dict` of the waiting rows (None before the
            first batch).
        waiting: ``(task id, line id)`` of the samples waiting in the packer, in packing order.
    """

    epoch: list[int]
    next_line: list[int]
    cur_window: list[int]
    epoch_samples: list[int]
    exhausted: list[bool]
    mix_tokens: list[int]
    mix_samples: list[int]
    out_tokens: list[int]
    out_samples: list[int]
    out_label_tokens: list[int]
    dropped_lines: list[int]
    drop_reasons: list[dict[str, int]] = field(default_factory=list)
    step: int = 0
    batches: int = 0
    finished: bool = False
    packer: dict[str, Any] | None = None
    waiting: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def initial(cls, num_datasets: int) -> "Position":
        """The position of a fresh loader over ``num_datasets`` datasets."""
        return cls(**{k: [v] * num_datasets for k, v in _PER_DATASET.items()},
                   drop_reasons=[{} for _ in range(num_datasets)])

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Position":
        """The position recorded in a state dict (see :meth:`to_state`)."""
        lists = {k: state[k].tolist() for k in _PER_DATASET}
        lists["exhausted"] = [bool(x) for x in lists["exhausted"]]
        packer = None if state["packer"] is None else _unpack_packer_state(state["packer"])
        reasons = state.get("drop_reasons") or [{} for _ in lists["epoch"]]  # (states of older versions: none)
        return cls(
            **lists, drop_reasons=[{str(k): int(v) for k, v in r.items()} for r in reasons],
            step=int(state["step"]), batches=int(state["batches"]), finished=bool(state["finished"]),
            packer=packer, waiting=[tuple(x) for x in state["waiting"].tolist()],  # type: ignore[misc]
        )

    def to_state(self, settings: StateSettings) -> dict[str, Any]:
        """The state dict: ``settings``' values, then this position as tensors and plain values."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT, "seed": settings.seed, "rank": settings.rank, "world_size": settings.world_size,
            "max_length": settings.max_length, "batch_size": settings.batch_size, "sampler": settings.sampler,
            "task_names": list(settings.task_names), "nlines": torch.tensor(settings.nlines, dtype=torch.int64),
        }
        for key in _PER_DATASET:
            dtype = torch.bool if key == "exhausted" else torch.int64
            state[key] = torch.tensor(getattr(self, key), dtype=dtype)
        state.update(
            drop_reasons=[dict(r) for r in self.drop_reasons],
            step=self.step, batches=self.batches, finished=self.finished,
            packer=None if self.packer is None else _pack_packer_state(self.packer),
            waiting=torch.tensor(self.waiting, dtype=torch.int64).reshape(-1, 2),
        )
        return state


def check_compatible(state: Any, settings: StateSettings) -> None:
    """Raise :class:`MixtureStateError` unless ``state`` was saved by a loader with ``settings``.

    The message names the mismatch (format, rank / world size, tasks, line counts, seed,
    max_length, batch_size, sampler) and what to do.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise MixtureStateError(f"not a MixtureLoader state (expected format {STATE_FORMAT!r})")
    if state["world_size"] != settings.world_size or state["rank"] != settings.rank:
        raise MixtureStateError(
            f"this loader state was saved by rank {state['rank']} of world_size {state['world_size']}, but this "
            f"loader is rank {settings.rank} of world_size {settings.world_size}. Resuming the data order with a "
            f"different number of ranks is not supported (each rank's shard and mixing order depend on it): resume "
            f"with world_size={state['world_size']}, or skip load_state_dict to start the data order afresh"
        )
    task_names = list(settings.task_names)
    if list(state["task_names"]) != task_names:
        raise MixtureStateError(
            f"the state's tasks {list(state['task_names'])} differ from this loader's {task_names}: "
            f"resume with the same dataset config (same entries, same order)"
        )
    saved, now = state["nlines"].tolist(), list(settings.nlines)
    if saved != now:
        changed = [t for t, a, b in zip(task_names, saved, now) if a != b]
        raise MixtureStateError(
            f"datasets {changed} have a different number of lines than when the state was saved "
            f"(saved {saved}, now {now}): the index was rebuilt; start the data order afresh"
        )
    for key in ("seed", "max_length", "batch_size", "sampler"):
        if state[key] != getattr(settings, key):
            raise MixtureStateError(
                f"the state was saved with {key}={state[key]!r} but this loader has {key}={getattr(settings, key)!r}; "
                f"use the same value to resume"
            )


def _pack_packer_state(sd: dict[str, Any]) -> dict[str, Any]:
    """The packer's waiting samples as a few flat tensors (instead of per-token Python lists)."""
    docs = [doc for row in sd["rows"] for doc in row]
    lengths = [len(doc[0]) for doc in docs]
    return {
        "batch_size": sd["batch_size"],
        "max_length": sd["max_length"],
        "row_sizes": torch.tensor([len(row) for row in sd["rows"]], dtype=torch.int64),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "task_ids": torch.tensor([int(doc[2]) for doc in docs], dtype=torch.int64),
        "input_ids": torch.tensor([t for doc in docs for t in doc[0]], dtype=torch.int64),
        "labels": torch.tensor([t for doc in docs for t in doc[1]], dtype=torch.int64),
    }


def _unpack_packer_state(st: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_pack_packer_state`: the :class:`Packer` state dict."""
    ids, labels = st["input_ids"].tolist(), st["labels"].tolist()
    lengths, tasks = st["lengths"].tolist(), st["task_ids"].tolist()
    docs, pos = [], 0
    for n, task in zip(lengths, tasks):
        docs.append([ids[pos : pos + n], labels[pos : pos + n], task])
        pos += n
    rows, i = [], 0
    for size in st["row_sizes"].tolist():
        rows.append(docs[i : i + size])
        i += size
    return {"batch_size": st["batch_size"], "max_length": st["max_length"], "rows": rows}
