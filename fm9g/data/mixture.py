"""Weighted multi-dataset mixing with per-rank shards and exact resume (SPEC §3.4–3.9).

A *dataset config* is the original JSON list, one entry per indexed dataset::

    [
      {"dataset_name": "wiki", "task_name": "wiki_zh", "path": "indexed/wiki",
       "abs_weight": 0.7, "transforms": "identity", "allow_repeat": true},
      {"dataset_name": "sft", "task_name": "chat", "path": "indexed/chat",
       "abs_weight": 0.3, "transforms": "chatml", "allow_repeat": false,
       "ave_tokens_per_line": 350}
    ]

:class:`MixtureLoader` turns it into an iterator of packed batches (the dicts of
:class:`fm9g.data.packing.Packer`, plus ``task_names``). What the numbers mean:

* ``abs_weight`` is a share of **tokens**: over a run, dataset *i* contributes
  ``abs_weight_i / sum(abs_weight)`` of the tokens drawn from the datasets still active, however
  long its samples are. (Without ``abs_weight`` on any entry, ``weight * nlines`` is a share of
  *samples*, as in the original.)
* Sampling (``sampler="deficit"``, default): each step picks, among the active datasets, the one
  furthest behind its token target, after adding a random jitter of up to one average sample
  (``u * avg_tokens_i`` with ``u ~ U[0, 1)``). The order of datasets is random, the expected pick
  rate of dataset *i* is ``∝ abs_weight_i / avg_tokens_i`` (the original rule), but the realised
  token shares stay within about one sample of the target instead of drifting by
  ``O(sqrt(n))`` samples. ``sampler="random"`` is the original independent draw with probability
  ``∝ abs_weight_i / avg_tokens_i``. ``avg_tokens_i`` is the running mean of the sample lengths
  drawn so far, seeded by ``ave_tokens_per_line`` (capped at ``max_length``; ``max_length`` when
  absent) which counts as one observed sample.
* ``allow_repeat: true`` (default): when a dataset's shard is used up, a new epoch starts with a
  new shuffled order. ``false``: the dataset drops out and the others share its weight.
* End of iteration: when every dataset has dropped out. A repeating dataset never drops out unless
  ``max_epochs`` is set (then it drops out after ``max_epochs`` passes), so a mixture with a
  repeating dataset is infinite by default and the trainer's ``train_iters`` ends the run. The
  last partial batch is flushed. Each dataset drops out exactly once (SPEC §6 bug 6).

Sharding: in epoch ``e`` dataset *i* is read in the order of a pseudo-random permutation of its
lines keyed by ``(seed, task_name, e)`` (a Feistel network: nothing is stored, any position is
computed on demand). Rank ``r`` of ``W`` reads positions ``r, r+W, r+2W, ...``: the ranks' line
sets are disjoint and together cover the dataset once per epoch. A dataset with fewer lines than
ranks is an error unless it repeats; then rank ``r`` reads line position ``r mod nlines``.

Resume: :meth:`MixtureLoader.state_dict` is a small dict of tensors and plain values (per
dataset: epoch, lines read, windows of the current long document handed out, tokens and samples
drawn; the mixer's step counter — its random numbers are a function of ``(seed, rank, step)``;
the packer's pending rows; statistics). It describes the position after the last batch handed to
the caller, even when background workers have prepared more. After
:meth:`MixtureLoader.load_state_dict` the loader yields exactly the batches the uninterrupted
loader would have yielded next. Changing ``world_size`` (or ``rank``) on resume is refused with
an error: resume with the same number of ranks, or start the data order fresh.

Background work (``num_workers > 0``): a thread runs the mixer and packer and ``num_workers``
spawned processes read, transform and tokenize lines ahead (the same lines in the same order
as without workers, so the batches are identical for any ``num_workers``).
"""
from __future__ import annotations

import copy
import math
import multiprocessing
import queue
import random
import threading
import zlib
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from fm9g._io import ConfigError, parse_bool, read_json
from fm9g.data.tokenize import OVERSIZE_RULES, SampleTokenizer, TokenizedSample
from fm9g.data.transforms import BUILTIN_TRANSFORMS, load_transform

__all__ = [
    "DatasetEntry",
    "MixtureConfigError",
    "MixtureStateError",
    "MixtureLoader",
    "load_dataset_config",
    "SAMPLERS",
]

STATE_FORMAT = "fm9g.mixture/1"
SAMPLERS = ("deficit", "random")
_KEY_ALIASES = {"avg_tokens": "ave_tokens_per_line", "ave_tokens": "ave_tokens_per_line"}
_REQUIRED = ("dataset_name", "task_name", "path")
_RNG_BLOCK = 256  # mixer random numbers are generated in blocks of this many steps


class MixtureConfigError(ValueError):
    """A dataset config (JSON file or list of entries) is invalid; the message names the entry and key."""


class MixtureStateError(ValueError):
    """A loader state cannot be loaded into this loader (different datasets, ranks or settings)."""


# ---------------------------------------------------------------------------------------------
# dataset config
# ---------------------------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(kw_only=True)
class DatasetEntry:
    """One entry of a dataset config (the keys of the original ``dataset_configs/*.json``).

    Attributes:
        dataset_name: a name for humans (logs).
        task_name: unique id of the entry; batches carry it via ``task_ids`` / ``task_names``.
        path: index directory written by :func:`fm9g.data.indexed.build_index`.
        abs_weight: share of tokens (see the module docstring); > 0. Either every entry has one
            or none has.
        transforms: ``None``/``"identity"``, ``"chatml"``, ``"chatml-original"``, ``"userai"``,
            a callable, or a path to a ``.py`` defining ``transform(data, num_sample, r)``.
        allow_repeat: start a new shuffled epoch when used up (else drop out).
        nlines: informational (the index's real line count is used).
        ave_tokens_per_line: initial guess of tokens per sample (aliases ``avg_tokens``,
            ``ave_tokens``); only seeds the running average.
        total_tokens: informational (billions of tokens).
        oversize_rule: ``"segment"``, ``"head"`` or ``"drop"`` (honoured, unlike the original).
        weight: sample-share weight, used (times the line count) only when no entry has ``abs_weight``.
        incontext_weight: weights of drawing ``num_sample = 0, 1, 2, ...`` for the transform.
        do_compact: cut the middle of over-long prompts (see :class:`SampleTokenizer`).
        is_long: informational (the original disabled PoSE for it).
    """

    dataset_name: str
    task_name: str
    path: str
    abs_weight: float | None = None
    transforms: str | Callable[..., Any] | None = None
    allow_repeat: bool = True
    nlines: int | None = None
    ave_tokens_per_line: float | None = None
    total_tokens: float | None = None
    oversize_rule: str = "segment"
    weight: float = 1.0
    incontext_weight: list[float] = field(default_factory=lambda: [1.0])
    do_compact: bool = False
    is_long: bool = False

    @classmethod
    def keys(cls) -> list[str]:
        """The accepted keys (aliases ``avg_tokens`` / ``ave_tokens`` not included)."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, base_dir: str | Path | None = None, where: str = "dataset entry"
    ) -> "DatasetEntry":
        """Build and validate an entry from one JSON object.

        Args:
            data: the JSON object (original keys; aliases accepted).
            base_dir: directory that relative ``path`` / ``transforms`` are resolved against
                (the dataset-config file's directory); default: the current directory.
            where: how to name this entry in error messages (e.g. ``"entry 2 of mix.json"``).

        Raises:
            MixtureConfigError: unknown key, missing required key, or an invalid value.
        """
        if not isinstance(data, dict):
            raise MixtureConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        name = data.get("task_name")
        label = f"{where} (task_name {name!r})" if name is not None else where
        kwargs: dict[str, Any] = {}
        allowed = set(cls.keys())
        for key, value in data.items():
            canon = _KEY_ALIASES.get(key, key)
            if canon not in allowed:
                raise MixtureConfigError(
                    f"{label}: unknown key {key!r}; allowed keys: {sorted(allowed | set(_KEY_ALIASES))}"
                )
            if canon in kwargs:
                raise MixtureConfigError(f"{label}: {key!r} repeats {canon!r} (give only one of them)")
            kwargs[canon] = value
        missing = [k for k in _REQUIRED if k not in kwargs]
        if missing:
            raise MixtureConfigError(f"{label}: missing required key(s) {missing}")
        base = Path(base_dir) if base_dir is not None else None
        if isinstance(kwargs["path"], str) and base is not None and not Path(kwargs["path"]).expanduser().is_absolute():
            kwargs["path"] = str(base / kwargs["path"])
        tr = kwargs.get("transforms")
        if isinstance(tr, str) and tr not in BUILTIN_TRANSFORMS and base is not None:
            if not Path(tr).expanduser().is_absolute():
                kwargs["transforms"] = str(base / tr)
        entry = cls(**kwargs)
        entry.validate(where=label)
        return entry

    def to_dict(self) -> dict[str, Any]:
        """The entry as a JSON-able dict (a callable ``transforms`` is written as its name)."""
        d = asdict(self)
        if callable(self.transforms):
            d["transforms"] = getattr(self.transforms, "__name__", repr(self.transforms))
        return d

    def validate(self, *, where: str = "dataset entry") -> None:
        """Check types and values (not the files); raise :class:`MixtureConfigError` naming the key."""

        def bad(key: str, why: str) -> MixtureConfigError:
            return MixtureConfigError(f"{where}: {key!r} {why} (got {getattr(self, key)!r})")

        for key in ("dataset_name", "task_name", "path"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v:
                raise bad(key, "must be a non-empty string")
        for key in ("abs_weight", "weight"):
            v = getattr(self, key)
            if v is None and key == "abs_weight":
                continue
            if not _is_number(v):
                raise bad(key, "must be a number")
            if not math.isfinite(v) or v <= 0:
                raise bad(key, "must be a finite number > 0 (drop the entry to give a dataset no weight)")
        for key in ("allow_repeat", "do_compact", "is_long"):
            try:  # the one boolean parser of fm9g configs: true/false, 1/0, "true"/"false", "1"/"0"
                setattr(self, key, parse_bool(getattr(self, key), key))
            except ConfigError:
                raise bad(key, "must be true or false") from None
        if self.ave_tokens_per_line is not None and (
            not _is_number(self.ave_tokens_per_line) or not self.ave_tokens_per_line > 0
        ):
            raise bad("ave_tokens_per_line", "must be a number > 0")
        if self.nlines is not None and (not _is_number(self.nlines) or self.nlines < 0):
            raise bad("nlines", "must be a number >= 0")
        if self.total_tokens is not None and (not _is_number(self.total_tokens) or self.total_tokens < 0):
            raise bad("total_tokens", "must be a number >= 0")
        if self.oversize_rule not in OVERSIZE_RULES:
            raise bad("oversize_rule", f"must be one of {list(OVERSIZE_RULES)}")
        iw = self.incontext_weight
        if (
            not isinstance(iw, (list, tuple))
            or not iw
            or not all(_is_number(x) and math.isfinite(x) and x >= 0 for x in iw)
            or not sum(iw) > 0
        ):
            raise bad("incontext_weight", "must be a non-empty list of numbers >= 0 with a positive sum")
        if self.transforms is not None and not isinstance(self.transforms, str) and not callable(self.transforms):
            raise bad("transforms", "must be a built-in name, a path to a .py file, or a callable")


def load_dataset_config(
    source: str | Path | Sequence[dict[str, Any] | DatasetEntry], *, base_dir: str | Path | None = None
) -> list[DatasetEntry]:
    """Read a dataset config: a JSON file (the original format, unchanged) or a list of entries.

    Args:
        source: path of the JSON list, or a Python list of dicts / :class:`DatasetEntry`.
        base_dir: for a list of dicts, the directory relative paths are resolved against
            (default: the current directory). For a file, its own directory is used.

    Returns:
        The validated entries, in file order.

    Raises:
        MixtureConfigError: unreadable / invalid JSON (with line and column), not a list, an
            invalid entry, duplicate ``task_name``, or ``abs_weight`` on some entries only.
        FileNotFoundError: the JSON file does not exist.
    """
    if isinstance(source, (str, Path)):
        cfg_path = Path(source).expanduser()
        if not cfg_path.is_file():
            raise FileNotFoundError(f"dataset config {cfg_path} not found")
        raw = read_json(cfg_path, expect=list, error=MixtureConfigError)
        items: Sequence[Any] = raw
        base: Path | None = cfg_path.resolve().parent
        src_name = str(cfg_path)
    else:
        if not isinstance(source, (list, tuple)):
            raise MixtureConfigError(f"dataset config must be a path or a list, got {type(source).__name__}")
        items, base, src_name = source, (Path(base_dir) if base_dir is not None else None), "the dataset list"
    if not items:
        raise MixtureConfigError(f"{src_name}: the dataset config is empty")
    entries: list[DatasetEntry] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"entry {i} of {src_name}"
        if isinstance(item, DatasetEntry):
            entry = copy.copy(item)
            entry.validate(where=f"{where} (task_name {entry.task_name!r})")
        else:
            entry = DatasetEntry.from_dict(item, base_dir=base, where=where)
        if entry.task_name in seen:
            raise MixtureConfigError(
                f"{src_name}: duplicate task_name {entry.task_name!r} in entries {seen[entry.task_name]} and {i}; "
                f"task names must be unique"
            )
        seen[entry.task_name] = i
        entries.append(entry)
    has_abs = [e.abs_weight is not None for e in entries]
    if any(has_abs) and not all(has_abs):
        missing = [e.task_name for e in entries if e.abs_weight is None]
        raise MixtureConfigError(
            f"{src_name}: 'abs_weight' is set on some entries but missing on {missing}; give every entry an "
            f"abs_weight (token shares) or none (then weight x nlines are sample shares)"
        )
    return entries


# ---------------------------------------------------------------------------------------------
# permutation and shards
# ---------------------------------------------------------------------------------------------
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class _Permutation:
    """A keyed pseudo-random bijection of ``[0, n)`` (balanced Feistel network + cycle walking).

    Computing ``perm(positions)`` costs O(len(positions)); nothing of size ``n`` is stored.
    """

    def __init__(self, n: int, key: Sequence[int]) -> None:
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(6, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Map positions (int array, each in ``[0, n)``) to line ids (int64 array, same shape)."""
        x = np.asarray(positions, dtype=np.uint64)
        if self.n <= 1:
            return np.zeros_like(x, dtype=np.int64)
        with np.errstate(over="ignore"):
            x = self._encrypt(x)
            out = x >= np.uint64(self.n)
            while out.any():  # cycle walking: stays a bijection of [0, n)
                x[out] = self._encrypt(x[out])
                out = x >= np.uint64(self.n)
        return x.astype(np.int64)


def _shard_len(n: int, rank: int, world: int) -> int:
    """Lines rank ``rank`` reads per epoch of an ``n``-line dataset."""
    if n < world:
        return 1  # only allowed for repeating datasets: rank r reads position r mod n
    return (n - rank + world - 1) // world


def _shard_positions(n: int, rank: int, world: int, k: np.ndarray) -> np.ndarray:
    """Epoch positions of this rank's shard indices ``k``."""
    if n < world:
        return np.full_like(k, rank % n)
    return rank + k * world


def _task_key(task_name: str) -> int:
    return zlib.crc32(task_name.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# reading + tokenizing lines (runs in the main process or in worker processes)
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class _ReaderSpec:
    """Everything a worker process needs to read and tokenize lines (picklable)."""

    entries: list[DatasetEntry]
    tokenizer: Any
    max_length: int
    seed: int
    rank: int
    world_size: int


class _Reader:
    """Reads the lines of each dataset's shard in epoch order and tokenizes them."""

    def __init__(self, spec: _ReaderSpec) -> None:
        from fm9g.data.indexed import IndexedDataset

        self.spec = spec
        self.datasets = [IndexedDataset(e.path) for e in spec.entries]
        self.transforms = [load_transform(e.transforms, None, e.task_name) for e in spec.entries]
        self.tokenizers = [
            SampleTokenizer(spec.tokenizer, spec.max_length, oversize_rule=e.oversize_rule, do_compact=e.do_compact)
            for e in spec.entries
        ]
        self.keys = [_task_key(e.task_name) for e in spec.entries]
        self._perm_cache: dict[tuple[int, int], _Permutation] = {}

    def permutation(self, d: int, epoch: int) -> _Permutation:
        key = (d, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            if len(self._perm_cache) > 4 * len(self.datasets):
                self._perm_cache.clear()
            perm = _Permutation(len(self.datasets[d]), (self.spec.seed, self.keys[d], epoch, 0x5EED))
            self._perm_cache[key] = perm
        return perm

    def line_ids(self, d: int, epoch: int, k: np.ndarray) -> np.ndarray:
        """Line ids read by this rank at shard indices ``k`` of dataset ``d`` in ``epoch``."""
        n = len(self.datasets[d])
        return self.permutation(d, epoch)(_shard_positions(n, self.spec.rank, self.spec.world_size, k))

    def transformed(self, d: int, epoch: int, line: int) -> dict | None:
        entry = self.spec.entries[d]
        # the transform's Random depends only on (seed, task, epoch, line): same on any worker
        rnd = random.Random((((self.spec.seed * 0x100000001B3) ^ self.keys[d]) << 72) + (epoch << 40) + line)
        iw = entry.incontext_weight
        num_sample = rnd.choices(range(len(iw)), weights=iw)[0] if len(iw) > 1 else 0
        data = self.datasets[d][int(line)]
        try:
            return self.transforms[d](data, num_sample, rnd)
        except Exception as err:
            msg = f"task {entry.task_name!r}, {entry.path} line {int(line)}: {type(err).__name__}: {err}"
            raise RuntimeError(msg) from err

    def read(self, d: int, epoch: int, k0: int, k1: int) -> list[tuple[int, list[TokenizedSample]]]:
        """``(line id, windows)`` of shard indices ``k0..k1-1`` (windows ``[]`` for a dropped line)."""
        lines = self.line_ids(d, epoch, np.arange(k0, k1, dtype=np.int64)).tolist()
        samples = [self.transformed(d, epoch, line) for line in lines]
        return list(zip(lines, self.tokenizers[d].batch(samples)))


_WORKER_READER: _Reader | None = None


def _worker_init(spec: _ReaderSpec) -> None:
    global _WORKER_READER
    torch.set_num_threads(1)
    _WORKER_READER = _Reader(spec)


def _worker_read(d: int, epoch: int, k0: int, k1: int) -> list[tuple[int, list[TokenizedSample]]]:
    assert _WORKER_READER is not None
    return _WORKER_READER.read(d, epoch, k0, k1)


class _LineSource:
    """Per-dataset read-ahead of tokenized lines, in chunks, inline or on an executor."""

    def __init__(self, reader: _Reader, shard_lens: list[int], executor: Executor | None, chunk: int, ahead: int):
        self.reader = reader
        self.shard_lens = shard_lens
        self.executor = executor
        self.chunk = chunk
        self.ahead = ahead if executor is not None else 1
        self.pending: list[dict[tuple[int, int], Future | list]] = [{} for _ in shard_lens]

    def _submit(self, d: int, epoch: int, c: int) -> None:
        k0 = c * self.chunk
        k1 = min(k0 + self.chunk, self.shard_lens[d])
        if self.executor is None:
            self.pending[d][(epoch, c)] = self.reader.read(d, epoch, k0, k1)
        else:
            self.pending[d][(epoch, c)] = self.executor.submit(_worker_read, d, epoch, k0, k1)

    def get(self, d: int, epoch: int, k: int) -> tuple[int, list[TokenizedSample]]:
        """``(line id, windows)`` of shard index ``k`` of dataset ``d`` in ``epoch``."""
        c = k // self.chunk
        n_chunks = -(-self.shard_lens[d] // self.chunk)
        for cc in range(c, min(c + self.ahead, n_chunks)):
            if (epoch, cc) not in self.pending[d]:
                self._submit(d, epoch, cc)
        item = self.pending[d][(epoch, c)]
        result = item.result() if isinstance(item, Future) else item
        if k == min((c + 1) * self.chunk, self.shard_lens[d]) - 1:  # last line of the chunk: forget it
            del self.pending[d][(epoch, c)]
            for key in [key for key in self.pending[d] if key[0] < epoch]:
                del self.pending[d][key]
        return result[k - c * self.chunk]

    def cancel(self) -> None:
        for p in self.pending:
            for item in p.values():
                if isinstance(item, Future):
                    item.cancel()
            p.clear()


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


# ---------------------------------------------------------------------------------------------
# the mixer + packer (one pass from a state)
# ---------------------------------------------------------------------------------------------
class _Producer:
    """Runs the mixing from a state; yields ``(batch, state_after_batch)``."""

    def __init__(self, loader: "MixtureLoader", state: dict[str, Any], source: _LineSource) -> None:
        from fm9g.data.packing import Packer

        self.L = loader
        self.source = source
        self.D = len(loader.entries)
        self.epoch = state["epoch"].tolist()
        self.next_line = state["next_line"].tolist()
        self.cur_window = state["cur_window"].tolist()
        self.epoch_samples = state["epoch_samples"].tolist()
        self.exhausted = [bool(x) for x in state["exhausted"].tolist()]
        self.mix_tokens = state["mix_tokens"].tolist()
        self.mix_samples = state["mix_samples"].tolist()
        self.out_tokens = state["out_tokens"].tolist()
        self.out_samples = state["out_samples"].tolist()
        self.out_label_tokens = state["out_label_tokens"].tolist()
        self.dropped_lines = state["dropped_lines"].tolist()
        self.step = int(state["step"])
        self.batches = int(state["batches"])
        self.finished = bool(state["finished"])
        self.packer = Packer(loader.batch_size, loader.max_length)
        if state["packer"] is not None:
            self.packer.load_state_dict(_unpack_packer_state(state["packer"]))
        # (task id, line id) of the samples waiting in the packer, in packing order
        self.waiting: list[tuple[int, int]] = [tuple(x) for x in state["waiting"].tolist()]  # type: ignore[misc]
        self.line_of: list[int] = [-1] * self.D  # line id of the window being handed out per dataset
        # windows of the line being handed out (re-tokenized on resume: deterministic)
        self.windows: list[list[TokenizedSample] | None] = [None] * self.D
        for d in range(self.D):
            if self.cur_window[d] >= 0:
                self.line_of[d], self.windows[d] = source.get(d, self.epoch[d], self.next_line[d] - 1)
        self._u_block = -1
        self._u: np.ndarray | None = None

    # -- randomness: a pure function of (seed, rank, step) --------------------------------------
    def _uniforms(self, step: int) -> np.ndarray:
        block = step // _RNG_BLOCK
        if block != self._u_block:
            rng = np.random.default_rng([self.L.seed, self.L.rank, block, 0x6D6978])
            self._u = rng.random((_RNG_BLOCK, self.D))
            self._u_block = block
        assert self._u is not None
        return self._u[step % _RNG_BLOCK]

    def _avg_tokens(self, d: int) -> float:
        prior = self.L._prior_tokens[d]
        if prior is None:
            return self.mix_tokens[d] / self.mix_samples[d] if self.mix_samples[d] else float(self.L.max_length)
        return (self.mix_tokens[d] + prior) / (self.mix_samples[d] + 1)

    def _pick(self) -> int | None:
        active = [d for d in range(self.D) if not self.exhausted[d]]
        if not active:
            return None
        u = self._uniforms(self.step)
        self.step += 1
        w = self.L._weights
        token_mode = self.L._token_shares
        if self.L.sampler == "deficit":
            best, best_score = -1, math.inf
            for d in active:
                unit = self._avg_tokens(d) if token_mode else 1.0
                progress = self.mix_tokens[d] if token_mode else self.mix_samples[d]
                score = (progress + float(u[d]) * unit) / w[d]
                if score < best_score:
                    best, best_score = d, score
            return best
        p = np.array([w[d] / (self._avg_tokens(d) if token_mode else 1.0) for d in active])
        c = np.cumsum(p / p.sum())
        return active[min(int(np.searchsorted(c, float(u[0]), side="right")), len(active) - 1)]

    def _next_sample(self, d: int) -> TokenizedSample | None:
        """The next window of dataset ``d``, or ``None`` when it drops out."""
        L = self.L
        while True:
            win = self.windows[d]
            if win is not None:
                s = win[self.cur_window[d]]
                self.cur_window[d] += 1
                if self.cur_window[d] == len(win):
                    self.windows[d], self.cur_window[d] = None, -1
                self.epoch_samples[d] += 1
                return s
            if self.next_line[d] < L._shard_lens[d]:
                line, win = self.source.get(d, self.epoch[d], self.next_line[d])
                if win:
                    self.windows[d], self.cur_window[d], self.line_of[d] = win, 0, line
                else:
                    self.dropped_lines[d] += 1
                self.next_line[d] += 1
                continue
            # this rank's shard of dataset d is used up
            entry = L.entries[d]
            repeat = entry.allow_repeat and (L.max_epochs is None or self.epoch[d] + 1 < L.max_epochs)
            if not repeat:
                self.exhausted[d] = True  # a flag, set once: never counted twice
                return None
            if self.epoch_samples[d] == 0:  # repeating it would loop forever
                raise RuntimeError(
                    f"task {entry.task_name!r} ({entry.path}): a whole epoch of this rank's shard "
                    f"({L._shard_lens[d]} lines) produced no sample (all dropped by the transform or "
                    f"the tokenizer: empty output, prompt longer than max_length={L.max_length}, or "
                    f"oversize_rule='drop'); fix the data or remove the entry"
                )
            self.epoch[d] += 1
            self.next_line[d] = 0
            self.epoch_samples[d] = 0

    def _finish(self, batch: dict[str, Any], lines: list[tuple[int, int]]) -> dict[str, Any]:
        task_ids = batch["task_ids"].reshape(-1)
        real = task_ids >= 0
        tok = torch.bincount(task_ids[real], minlength=self.D).tolist()
        starts = real & (batch["position_ids"].reshape(-1) == 0)
        smp = torch.bincount(task_ids[starts], minlength=self.D).tolist()
        labelled = real & (batch["labels"].reshape(-1) != -100)
        lab = torch.bincount(task_ids[labelled], minlength=self.D).tolist()
        for d in range(self.D):
            self.out_tokens[d] += tok[d]
            self.out_samples[d] += smp[d]
            self.out_label_tokens[d] += lab[d]
        self.batches += 1
        batch["task_names"] = list(self.L.task_names)
        batch["sample_lines"] = torch.tensor(lines, dtype=torch.int64).reshape(-1, 2)
        return batch

    def snapshot(self) -> dict[str, Any]:
        """The state after the last batch produced (small: tensors of length D, the packer's rows)."""

        def t(x: list) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64)

        L = self.L
        return {
            "format": STATE_FORMAT,
            "seed": L.seed,
            "rank": L.rank,
            "world_size": L.world_size,
            "max_length": L.max_length,
            "batch_size": L.batch_size,
            "sampler": L.sampler,
            "task_names": list(L.task_names),
            "nlines": t(L._nlines),
            "epoch": t(self.epoch),
            "next_line": t(self.next_line),
            "cur_window": t(self.cur_window),
            "epoch_samples": t(self.epoch_samples),
            "exhausted": torch.tensor(self.exhausted, dtype=torch.bool),
            "mix_tokens": t(self.mix_tokens),
            "mix_samples": t(self.mix_samples),
            "out_tokens": t(self.out_tokens),
            "out_samples": t(self.out_samples),
            "out_label_tokens": t(self.out_label_tokens),
            "dropped_lines": t(self.dropped_lines),
            "step": self.step,
            "batches": self.batches,
            "finished": self.finished,
            "packer": _pack_packer_state(self.packer.state_dict()),
            "waiting": torch.tensor(self.waiting, dtype=torch.int64).reshape(-1, 2),
        }

    def run(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        if self.finished:
            return
        while True:
            d = self._pick()
            if d is None:
                break
            sample = self._next_sample(d)
            if sample is None:
                continue
            self.mix_tokens[d] += len(sample.input_ids)
            self.mix_samples[d] += 1
            batch = self.packer.add(sample, d)
            self.waiting.append((d, self.line_of[d]))
            if batch is not None:
                # the batch holds everything added before this sample, which starts the next one
                batch = self._finish(batch, self.waiting[:-1])
                self.waiting = self.waiting[-1:]
                yield batch, self.snapshot()
        batch = self.packer.flush()
        self.finished = True
        if batch is not None:
            batch = self._finish(batch, self.waiting)
            self.waiting = []
        yield batch, self.snapshot()  # type: ignore[misc]  # batch None: only the final state


# ---------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------
_STOP = object()


class MixtureLoader:
    """Iterate packed batches drawn from several indexed datasets by weight (module docstring).

    Args:
        entries: the dataset config (see :func:`load_dataset_config`).
        tokenizer: a Hugging Face tokenizer (a fast one for speed; must be picklable when
            ``num_workers > 0``), or a tokenizer directory / hub name for ``AutoTokenizer``.
        max_length: row length L of a packed batch (and the longest sample).
        batch_size: rows B per batch.
        seed: seeds the line order of every epoch (same on all ranks) and the mixer (per rank).
        rank / world_size: this process's data-parallel rank and the number of ranks.
        num_workers: 0 = everything in the iterating thread; ``n > 0`` = a background thread
            mixes and packs while ``n`` spawned processes read and tokenize ahead.
        prefetch: batches the background thread may prepare ahead (``num_workers > 0``).
        sampler: ``"deficit"`` (default) or ``"random"`` (module docstring).
        max_epochs: if set, a repeating dataset drops out after this many passes over its shard.
        chunk_lines: lines per read-ahead task of a worker.
        start_method: how worker processes start (``"spawn"``, safe with threads and CUDA; a
            script that uses workers needs the ``if __name__ == "__main__":`` guard). ``"fork"``
            starts faster but forks a possibly multi-threaded process.
        base_dir: for a list of dicts, the directory relative paths are resolved against.

    Raises:
        MixtureConfigError: bad entries, a missing index / transform, or a record that the
            transform turns into something without ``output``; a non-repeating dataset with fewer
            lines than ``world_size``; bad rank / world size / sampler.

    Iterating yields the packer's batch dicts — ``input_ids`` / ``labels`` / ``position_ids`` /
    ``task_ids`` Long[B, L], ``cu_seqlens`` Int32[n+1], ``max_seqlen``, ``num_tokens``,
    ``num_label_tokens`` — plus ``task_names`` (list[str], indexed by ``task_ids``) and
    ``sample_lines`` Long[n, 2]: ``(task id, line id in the index)`` of each packed sample in
    packing order (a long document's windows repeat its line id).
    ``iter(loader)`` continues from the current state (fresh, loaded, or after the last batch
    yielded).
    """

    def __init__(
        self,
        entries: Sequence[DatasetEntry | dict[str, Any]],
        tokenizer: Any,
        max_length: int,
        batch_size: int,
        *,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch: int = 8,
        sampler: str = "deficit",
        max_epochs: int | None = None,
        chunk_lines: int = 32,
        start_method: str = "spawn",
        base_dir: str | Path | None = None,
    ) -> None:
        self.entries = load_dataset_config(list(entries), base_dir=base_dir)
        if not (isinstance(world_size, int) and world_size >= 1):
            raise MixtureConfigError(f"world_size must be an int >= 1, got {world_size!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise MixtureConfigError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if sampler not in SAMPLERS:
            raise MixtureConfigError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < 1):
            raise MixtureConfigError(f"max_epochs must be None or an int >= 1, got {max_epochs!r}")
        if int(max_length) < 4 or int(batch_size) < 1:
            raise MixtureConfigError(f"need max_length >= 4 and batch_size >= 1, got {max_length}, {batch_size}")
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=True)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.num_workers = int(num_workers)
        self.prefetch = max(1, int(prefetch))
        self.sampler = sampler
        self.max_epochs = max_epochs
        self.chunk_lines = max(1, int(chunk_lines))
        if start_method not in multiprocessing.get_all_start_methods():
            raise MixtureConfigError(
                f"start_method must be one of {multiprocessing.get_all_start_methods()}, got {start_method!r}"
            )
        self.start_method = start_method
        self.task_names = [e.task_name for e in self.entries]

        # -- files: each problem is an error now, not in the middle of training ---------------
        for e in self.entries:
            p = Path(e.path).expanduser()
            if not p.is_dir():
                raise MixtureConfigError(
                    f"task {e.task_name!r}: dataset path {p} does not exist or is not a directory; "
                    f"build it with `fm9g build-index <data.jsonl> {p}` or fix 'path' in the dataset config"
                )
            try:
                load_transform(e.transforms, None, e.task_name)
            except FileNotFoundError as err:
                raise MixtureConfigError(str(err)) from err
        self._spec = _ReaderSpec(
            entries=self.entries, tokenizer=tokenizer, max_length=self.max_length, seed=self.seed,
            rank=rank, world_size=world_size,
        )
        try:
            self._reader = _Reader(self._spec)
        except MixtureConfigError:
            raise
        except Exception as err:
            raise MixtureConfigError(f"cannot open the datasets: {err}") from err
        self._nlines: list[int] = []
        for e, ds in zip(self.entries, self._reader.datasets):
            n = len(ds)
            if n == 0:
                raise MixtureConfigError(f"task {e.task_name!r}: dataset {e.path} has no lines")
            if n < world_size and not e.allow_repeat:
                raise MixtureConfigError(
                    f"task {e.task_name!r}: dataset {e.path} has {n} line(s), fewer than world_size={world_size}, "
                    f"and allow_repeat is false, so some ranks would get no data; set \"allow_repeat\": true "
                    f"or use fewer ranks"
                )
            self._nlines.append(n)
        self._shard_lens = [_shard_len(n, rank, world_size) for n in self._nlines]
        self._token_shares = self.entries[0].abs_weight is not None
        if self._token_shares:
            total = sum(float(e.abs_weight) for e in self.entries)  # type: ignore[arg-type]
            self._weights = [float(e.abs_weight) / total for e in self.entries]  # type: ignore[arg-type]
        else:
            raw = [float(e.weight) * n for e, n in zip(self.entries, self._nlines)]
            total = sum(raw)
            self._weights = [w / total for w in raw]
        key = "abs_weight" if self._token_shares else "weight"
        if not math.isfinite(total) or not all(w > 0 for w in self._weights):
            raise MixtureConfigError(
                f"the {key} values {[getattr(e, key) for e in self.entries]} (tasks {[e.task_name for e in self.entries]}) "
                f"cannot be normalised: their sum is {total}; give shares of moderate size such as 0.7 and 0.3")
        self._prior_tokens: list[float | None] = [
            None if e.ave_tokens_per_line is None else float(min(e.ave_tokens_per_line, self.max_length))
            for e in self.entries
        ]
        self._check_first_records()
        self._state = self._initial_state()
        self._generation = 0
        self._executor: ProcessPoolExecutor | None = None

    @classmethod
    def from_config(
        cls,
        path_or_list: str | Path | Sequence[DatasetEntry | dict[str, Any]],
        tokenizer: Any,
        max_length: int,
        batch_size: int,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> "MixtureLoader":
        """Build a loader from a dataset-config JSON file (original format) or a list of entries.

        Relative ``path`` / ``transforms`` in a file are resolved against the file's directory.
        Other keyword arguments are those of :class:`MixtureLoader`.
        """
        entries = load_dataset_config(path_or_list, base_dir=kwargs.pop("base_dir", None))
        return cls(
            entries, tokenizer, max_length, batch_size, seed=seed, rank=rank, world_size=world_size,
            num_workers=num_workers, **kwargs,
        )

    # -- checks ---------------------------------------------------------------------------------
    def _check_first_records(self) -> None:
        """Run each dataset's transform on its first line: a missing field fails now, clearly."""
        for d, e in enumerate(self.entries):
            try:
                sample = self._reader.transformed(d, 0, 0)
            except Exception as err:
                raise MixtureConfigError(f"task {e.task_name!r}: transform failed on line 0: {err}") from err
            if sample is not None and not isinstance(sample.get("output"), str):
                data = self._reader.datasets[d][0]
                raise MixtureConfigError(
                    f"task {e.task_name!r}: line 0 of {e.path} has no string field 'output' after the transform "
                    f"{e.transforms or 'identity'!r} (record keys: {sorted(data)}; transformed keys: "
                    f"{sorted(sample)}); write {{'input': ..., 'output': ...}} records or a transform that makes them"
                )

    # -- state ----------------------------------------------------------------------------------
    def _initial_state(self) -> dict[str, Any]:
        D = len(self.entries)
        z = torch.zeros(D, dtype=torch.int64)
        return {
            "format": STATE_FORMAT, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "max_length": self.max_length, "batch_size": self.batch_size, "sampler": self.sampler,
            "task_names": list(self.task_names), "nlines": torch.tensor(self._nlines, dtype=torch.int64),
            "epoch": z.clone(), "next_line": z.clone(), "cur_window": torch.full((D,), -1, dtype=torch.int64),
            "epoch_samples": z.clone(), "exhausted": torch.zeros(D, dtype=torch.bool),
            "mix_tokens": z.clone(), "mix_samples": z.clone(), "out_tokens": z.clone(), "out_samples": z.clone(),
            "out_label_tokens": z.clone(), "dropped_lines": z.clone(), "step": 0, "batches": 0, "finished": False, "packer": None,
            "waiting": torch.zeros((0, 2), dtype=torch.int64),
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (tensors, ints, strings; ``weights_only``-safe).

        Save it with ``torch.save`` next to the model checkpoint; pass it to :meth:`load_state_dict`.
        """
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader with the same config).

        The next ``iter(self)`` yields exactly the batches the saved loader would have yielded next.

        Raises:
            MixtureStateError: the state comes from a different mixture (task names, line counts),
                different settings (seed, max_length, batch_size, sampler), or a different
                rank / world size — the message names the mismatch and what to do.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise MixtureStateError(f"not a MixtureLoader state (expected format {STATE_FORMAT!r})")
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise MixtureStateError(
                f"this loader state was saved by rank {state['rank']} of world_size {state['world_size']}, but this "
                f"loader is rank {self.rank} of world_size {self.world_size}. Resuming the data order with a different "
                f"number of ranks is not supported (each rank's shard and mixing order depend on it): resume with "
                f"world_size={state['world_size']}, or skip load_state_dict to start the data order afresh"
            )
        if list(state["task_names"]) != self.task_names:
            raise MixtureStateError(
                f"the state's tasks {list(state['task_names'])} differ from this loader's {self.task_names}: "
                f"resume with the same dataset config (same entries, same order)"
            )
        nl = state["nlines"].tolist()
        if nl != self._nlines:
            changed = [t for t, a, b in zip(self.task_names, nl, self._nlines) if a != b]
            raise MixtureStateError(
                f"datasets {changed} have a different number of lines than when the state was saved "
                f"(saved {nl}, now {self._nlines}): the index was rebuilt; start the data order afresh"
            )
        for key in ("seed", "max_length", "batch_size", "sampler"):
            if state[key] != getattr(self, key):
                raise MixtureStateError(
                    f"the state was saved with {key}={state[key]!r} but this loader has {key}={getattr(self, key)!r}; "
                    f"use the same value to resume"
                )
        self._state = copy.deepcopy(state)
        self._generation += 1

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        gen = self._generation
        if self.num_workers <= 0:
            return self._iter_inline(gen)
        return self._iter_background(gen)

    def _source(self) -> _LineSource:
        executor = None
        if self.num_workers > 0:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.num_workers, mp_context=multiprocessing.get_context(self.start_method),
                    initializer=_worker_init, initargs=(self._spec,),
                )
            executor = self._executor
        ahead = max(2, 2 * self.num_workers)
        return _LineSource(self._reader, self._shard_lens, executor, self.chunk_lines, ahead)

    def _iter_inline(self, gen: int) -> Iterator[dict[str, Any]]:
        producer = _Producer(self, self._state, self._source())
        for batch, snap in producer.run():
            if gen != self._generation:
                return
            self._state = snap
            if batch is not None:
                yield batch

    def _iter_background(self, gen: int) -> Iterator[dict[str, Any]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        source = self._source()
        state = self._state

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                producer = _Producer(self, state, source)
                for item in producer.run():
                    if not put(item):
                        return
                put(_STOP)
            except BaseException as err:  # handed to the consumer, raised there
                put(err)

        thread = threading.Thread(target=work, name="fm9g-mixture", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _STOP:
                    return
                if isinstance(item, BaseException):
                    raise item
                if gen != self._generation:
                    return
                batch, snap = item
                self._state = snap
                if batch is not None:
                    yield batch
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()
            source.cancel()

    def close(self) -> None:
        """Stop the worker processes (a later ``iter()`` starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "MixtureLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- statistics -----------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per task, counted over the batches handed out so far (kept across resume).

        Returns:
            ``{task_name: {"samples", "tokens", "label_tokens", "dropped_lines", "epoch", "exhausted",
            "avg_tokens", "weight"}}`` — ``samples`` are packed sequences (documents or windows),
            ``tokens`` real (non-pad) tokens, ``dropped_lines`` lines read but skipped (transform
            returned None, empty output, prompt too long, ``oversize_rule="drop"``), ``epoch`` the current pass over this rank's shard (0-based),
            ``avg_tokens`` the running mean sample length the mixer uses, ``weight`` the
            normalised abs_weight (or weight x nlines).
        """
        s = self._state
        out: dict[str, dict[str, Any]] = {}
        for d, name in enumerate(self.task_names):
            mt, ms = int(s["mix_tokens"][d]), int(s["mix_samples"][d])
            prior = self._prior_tokens[d]
            if prior is None:
                avg = mt / ms if ms else float(self.max_length)
            else:
                avg = (mt + prior) / (ms + 1)
            out[name] = {
                "samples": int(s["out_samples"][d]),
                "tokens": int(s["out_tokens"][d]),
                "label_tokens": int(s["out_label_tokens"][d]),
                "dropped_lines": int(s["dropped_lines"][d]),
                "epoch": int(s["epoch"][d]),
                "exhausted": bool(s["exhausted"][d]),
                "avg_tokens": avg,
                "weight": self._weights[d],
            }
        return out

    @property
    def finished(self) -> bool:
        """True once every dataset has dropped out and the last batch was handed out."""
        return bool(self._state["finished"])

    def __repr__(self) -> str:
        return (
            f"MixtureLoader(tasks={self.task_names}, max_length={self.max_length}, batch_size={self.batch_size}, "
            f"rank={self.rank}/{self.world_size}, num_workers={self.num_workers}, sampler={self.sampler!r})"
        )
