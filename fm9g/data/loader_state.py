"""The state of a :class:`fm9g.data.mixture.MixtureLoader`: its layout (written here once), packing
it into a few tensors, and checking that a saved state fits a loader.

A state is a dict of tensors and plain values (``torch.load(..., weights_only=True)`` reads it).
Two formats:

``fm9g.mixture/2`` (the global stream, :mod:`fm9g.data.stream`): the settings (``format``,
``seed``, ``max_length``, ``sampler``, ``task_names``, ``nlines``); the stream's ``num_lanes``
(K) and ``rows`` (rows of the global stream consumed by all ranks together); the layout that saved
it (``world_size``, ``rank``, ``batch_size``, ``grad_accum``) and ``micro_batches`` (handed out by
this rank since that layout began); ``finished``; and ``lanes``: the :class:`Position` of each lane
this rank holds, stacked — ``id`` Long[m], per dataset Long[m, D] / Bool[m, D] (``epoch``,
``next_line``, ...), per lane Long[m] (``step``, ``batches`` = rows the lane made, ``finished``),
``drop_reasons``, the packers' waiting rows as flat tensors and ``waiting`` Long[n, 2] with
``waiting_counts`` Long[m]. The states of all ranks together hold every lane: any number of ranks
resumes from them (:func:`merge_lanes`).

``fm9g.mixture/1`` (one rank's own mixture, written before the global stream; still loaded on
the same rank and world size): the settings it was saved with (``format``, ``seed``, ``rank``,
``world_size``, ``max_length``, ``batch_size``, ``sampler``, ``task_names``, ``nlines``), then the
:class:`Position`: per dataset (Long[D] / Bool[D]) the epoch, shard index, window, counters and the
drop-out flag; the mixer's step; the packer's waiting rows as flat tensors; ``waiting`` Long[n, 2]
= ``(task id, line id)`` of the samples in the packer. A lane's own state is this format too (its
``rank`` / ``world_size`` are the lane and the number of lanes, ``batch_size`` 1). See
docs/mixture.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["STATE_FORMAT", "STREAM_FORMAT", "MixtureStateError", "Position", "StateSettings", "check_compatible",
           "check_stream_compatible", "pack_lanes", "unpack_lanes", "merge_lanes"]

STATE_FORMAT = "fm9g.mixture/1"
STREAM_FORMAT = "fm9g.mixture/2"


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
            f"loader is rank {settings.rank} of world_size {settings.world_size}. It is a per-rank state "
            f"({STATE_FORMAT}, written by an fm9g before the global data stream): each rank's shard and mixing "
            f"order depend on the number of ranks, so it resumes only as rank {state['rank']} of world_size "
            f"{state['world_size']}. Resume with world_size={state['world_size']}, or skip load_state_dict to start "
            "the data order afresh (states saved now resume on any number of ranks)"
        )
    _check_same_data(state, settings)
    if state["batch_size"] != settings.batch_size:
        raise MixtureStateError(
            f"the state was saved with batch_size={state['batch_size']!r} but this loader has "
            f"batch_size={settings.batch_size!r}; use the same value to resume (a per-rank state, {STATE_FORMAT})"
        )


def check_stream_compatible(state: Any, settings: StateSettings) -> None:
    """Raise :class:`MixtureStateError` unless ``state`` (format ``fm9g.mixture/2``) was saved by a
    loader over the same datasets with the same seed, max_length and sampler (any ranks, batch
    size or grad_accum); the message names the mismatch and what to do."""
    if not isinstance(state, dict) or state.get("format") != STREAM_FORMAT:
        raise MixtureStateError(
            f"not a MixtureLoader state (expected format {STREAM_FORMAT!r} or {STATE_FORMAT!r}; a list holds "
            "the state_dict() of each rank)")
    _check_same_data(state, settings)


def _check_same_data(state: dict[str, Any], settings: StateSettings) -> None:
    """The state's tasks, line counts, seed, max_length and sampler must be the loader's."""
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
    for key in ("seed", "max_length", "sampler"):
        if state[key] != getattr(settings, key):
            raise MixtureStateError(
                f"the state was saved with {key}={state[key]!r} but this loader has {key}={getattr(settings, key)!r}; "
                f"use the same value to resume"
            )


def pack_lanes(lanes: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Stack the lanes' own states (format ``fm9g.mixture/1``, ``{lane: state}``) into the few
    tensors of a stream state's ``lanes`` entry (module docstring)."""
    ids = sorted(lanes)
    pos = [Position.from_state(lanes[i]) for i in ids]
    out: dict[str, Any] = {"id": torch.tensor(ids, dtype=torch.int64)}
    for key in _PER_DATASET:
        dtype = torch.bool if key == "exhausted" else torch.int64
        out[key] = torch.tensor([getattr(p, key) for p in pos], dtype=dtype).reshape(len(pos), -1)
    for key in ("step", "batches", "finished"):
        out[key] = torch.tensor([getattr(p, key) for p in pos], dtype=torch.bool if key == "finished" else torch.int64)
    out["drop_reasons"] = [[dict(r) for r in p.drop_reasons] for p in pos]
    rows = [row for p in pos if p.packer is not None for row in p.packer["rows"]]
    max_length = next((p.packer["max_length"] for p in pos if p.packer is not None), 0)
    out["packer_rows"] = torch.tensor([-1 if p.packer is None else len(p.packer["rows"]) for p in pos], dtype=torch.int64)
    out["packer"] = _pack_packer_state({"batch_size": 1, "max_length": max_length, "rows": rows})
    out["waiting_counts"] = torch.tensor([len(p.waiting) for p in pos], dtype=torch.int64)
    out["waiting"] = torch.tensor([w for p in pos for w in p.waiting], dtype=torch.int64).reshape(-1, 2)
    return out


def unpack_lanes(packed: dict[str, Any], settings_of: Any) -> dict[int, dict[str, Any]]:
    """Inverse of :func:`pack_lanes`: ``{lane: its own state}``, each made with ``settings_of(lane)``
    (a :class:`StateSettings`: the lane's plan)."""
    ids = packed["id"].tolist()
    per = {k: packed[k].tolist() for k in _PER_DATASET}
    scalars = {k: packed[k].tolist() for k in ("step", "batches", "finished")}
    rows = _unpack_packer_state(packed["packer"])["rows"]
    max_length = int(packed["packer"]["max_length"])
    waiting, counts = packed["waiting"].tolist(), packed["waiting_counts"].tolist()
    out, r, w = {}, 0, 0
    for i, lane in enumerate(ids):
        n = int(packed["packer_rows"][i])
        packer = None if n < 0 else {"batch_size": 1, "max_length": max_length, "rows": rows[r : r + n]}
        r += max(n, 0)
        pos = Position(
            **{k: list(per[k][i]) for k in _PER_DATASET}, drop_reasons=[dict(x) for x in packed["drop_reasons"][i]],
            step=int(scalars["step"][i]), batches=int(scalars["batches"][i]), finished=bool(scalars["finished"][i]),
            packer=packer, waiting=[tuple(x) for x in waiting[w : w + counts[i]]],  # type: ignore[misc]
        )
        w += counts[i]
        out[lane] = pos.to_state(settings_of(lane))
    return out


def lane_rows_before(rows: int, lane: int, num_lanes: int) -> int:
    """Rows of ``lane`` among the first ``rows`` rows of a stream of ``num_lanes`` lanes (row ``j``
    is row ``j // num_lanes`` of lane ``j % num_lanes``)."""
    return (rows - lane + num_lanes - 1) // num_lanes if rows > lane else 0


def merge_lanes(states: list[dict[str, Any]], lanes_of: list[dict[int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """The lanes of the global stream from the states of several ranks (format ``fm9g.mixture/2``)
    and their unpacked ``lanes_of``: per lane the state that made the most rows, checked against
    the stream position ``rows`` the states agree on.

    Raises:
        MixtureStateError: states of different streams or positions, or a lane made past the
            position (a state saved in the middle of an optimizer step on several ranks).
    """
    head = states[0]
    for st in states[1:]:
        if (st["num_lanes"], st["rows"]) != (head["num_lanes"], head["rows"]):
            raise MixtureStateError(
                f"the loader states given were saved at different places: one at row {head['rows']} of a stream "
                f"of {head['num_lanes']} lanes, one at row {st['rows']} of {st['num_lanes']} lanes; pass the "
                "state_dict() of every rank saved at the same step")
    merged: dict[int, dict[str, Any]] = {}
    for lanes in lanes_of:
        for lane, st in lanes.items():
            if lane not in merged or st["batches"] > merged[lane]["batches"]:
                merged[lane] = st
    k, c = int(head["num_lanes"]), int(head["rows"])
    for lane, st in merged.items():
        if st["batches"] > lane_rows_before(c, lane, k):
            raise MixtureStateError(
                f"lane {lane} of the loader state has made {st['batches']} rows, past row {c} of the stream where "
                "the state says the ranks stand: the states were saved in the middle of an optimizer step "
                "(grad_accum > 1 on several ranks); save after a whole step (the Trainer always does)")
    return merged


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
