"""Reading a mixture's lines: each dataset's shard in epoch order, transformed and tokenized, in
the iterating process or ahead of time in worker processes (the same lines either way, so the
batches do not depend on the number of workers). See docs/mixture.md.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import random
import threading
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fm9g.data.chat import ChatTemplateError, ChatTokenizer
from fm9g.data.entries import DatasetEntry
from fm9g.data.indexed import IndexedDataset
from fm9g.data.order import ShardOrder
from fm9g.data.records import RecordError, is_chat_record
from fm9g.data.split import split_lines
from fm9g.data.tokenize import SampleTokenizer, TokenizedSample
from fm9g.data.transforms import load_transform

__all__ = ["ReaderSpec", "Reader", "LineSource", "worker_init"]

#: ``(line id, windows)`` of each line read; ``windows`` is ``[]`` for a dropped line.
Lines = list[tuple[int, list[TokenizedSample]]]


@dataclass(kw_only=True)
class ReaderSpec:
    """Everything a worker process needs to read and tokenize lines (picklable)."""

    entries: list[DatasetEntry]
    tokenizer: Any
    max_length: int
    seed: int
    rank: int
    world_size: int
    holdout: float = 0.0  # eval_split: the share of each dataset's lines held out (fm9g.data.split)
    split: str = "train"  # which side of the split is read: "train" or "eval"


class Reader:
    """Reads the lines of each dataset's shard in epoch order and tokenizes them."""

    def __init__(self, spec: ReaderSpec) -> None:
        self.spec = spec
        self.datasets = [IndexedDataset(e.path) for e in spec.entries]
        # with a held-out split, dataset d is read through the line ids of its side (None: every line)
        self.lines = [split_lines(len(ds), spec.holdout, e.task_name, spec.split) if spec.holdout else None
                      for e, ds in zip(spec.entries, self.datasets)]
        self.transforms = [load_transform(e.transforms, None, e.task_name) for e in spec.entries]
        self.tokenizers = [
            SampleTokenizer(spec.tokenizer, spec.max_length, oversize_rule=e.oversize_rule, do_compact=e.do_compact,
                            bos=e.bos)
            for e in spec.entries
        ]
        self._chat: dict[int, ChatTokenizer] = {}
        self.order = ShardOrder(
            [self.num_lines(d) for d in range(len(self.datasets))], [e.task_name for e in spec.entries], spec.seed, spec.rank,
            spec.world_size,
        )

    def num_lines(self, d: int) -> int:
        """Lines dataset ``d`` contributes: its side of the held-out split, else all of them."""
        lines = self.lines[d]
        return len(self.datasets[d]) if lines is None else int(lines.size)

    def transformed(self, d: int, epoch: int, line: int) -> dict | None:
        """Line ``line`` of dataset ``d`` after its transform (``None``: the transform skips it)."""
        entry = self.spec.entries[d]
        # the transform's Random depends only on (seed, task, epoch, line): same on any worker
        rnd = random.Random((((self.spec.seed * 0x100000001B3) ^ self.order.keys[d]) << 72) + (epoch << 40) + line)
        iw = entry.incontext_weight
        num_sample = rnd.choices(range(len(iw)), weights=iw)[0] if len(iw) > 1 else 0
        data = self.datasets[d][int(line)]
        try:
            return self.transforms[d](data, num_sample, rnd)
        except Exception as err:
            msg = f"task {entry.task_name!r}, {entry.path} line {int(line)}: {type(err).__name__}: {err}"
            raise RuntimeError(msg) from err

    def read(self, d: int, epoch: int, k0: int, k1: int, part: tuple[int, int] | None = None) -> Lines:
        """``(line id, windows)`` of shard indices ``k0..k1-1`` (windows ``[]`` for a dropped line)
        of this rank's shard, or of ``part = (lane, lanes)``'s."""
        ids = self.order.line_ids(d, epoch, np.arange(k0, k1, dtype=np.int64), part)
        lines = (ids if self.lines[d] is None else self.lines[d][ids]).tolist()  # line ids in the index
        samples = [self.transformed(d, epoch, line) for line in lines]
        return list(zip(lines, self.tokenize(d, lines, samples)))

    def chat_tokenizer(self, d: int) -> ChatTokenizer:
        """The chat template renderer of dataset ``d`` (made on first use)."""
        if d not in self._chat:
            e = self.spec.entries[d]
            try:
                self._chat[d] = ChatTokenizer(self.spec.tokenizer, self.spec.max_length,
                                              chat_template=e.chat_template or "tokenizer", train_on=e.train_on,
                                              bos=e.bos, oversize_rule=e.oversize_rule)
            except ChatTemplateError as err:
                raise ChatTemplateError(f"task {e.task_name!r} ({e.path}): {err}") from err
        return self._chat[d]

    def tokenize(self, d: int, lines: list[int], samples: list[dict | None]) -> list[list[TokenizedSample]]:
        """Windows of each transformed sample of dataset ``d``: chat records (or every record, when the
        entry names a ``chat_template``) through the chat template, the others as ``{input, output}``.

        Raises:
            ChatTemplateError: a record the template cannot render or that has nothing to train,
                naming the index's data.jsonl and line.
        """
        entry = self.spec.entries[d]
        chat = [i for i, s in enumerate(samples) if s is not None and (entry.chat_template or is_chat_record(s))]
        if not chat:
            return self.tokenizers[d].batch(samples)
        out: list[list[TokenizedSample]] = [[] for _ in samples]
        plain = sorted(set(range(len(samples))) - set(chat))
        for i, windows in zip(plain, self.tokenizers[d].batch([samples[i] for i in plain])):
            out[i] = windows
        try:
            rendered = self.chat_tokenizer(d).batch([samples[i] for i in chat])
        except (RecordError, ChatTemplateError) as err:
            line = lines[chat[getattr(err, "index", 0)]]
            raise ChatTemplateError(f"task {entry.task_name!r}: {entry.path}/data.jsonl:{int(line) + 1}: {err}") from err
        for i, windows in zip(chat, rendered):
            out[i] = windows
        return out


# A worker process's reader, built once by its pool's initializer (ProcessPoolExecutor runs plain
# functions in the worker, so the reader has to live at module level there). Never set in the
# iterating process.
_WORKER_READER: Reader | None = None


def worker_init(spec: ReaderSpec) -> None:
    """Initializer of a worker process: exit with the parent, one thread for torch, its own
    :class:`Reader`."""
    global _WORKER_READER
    exit_with_parent()
    torch.set_num_threads(1)
    _WORKER_READER = Reader(spec)


def exit_with_parent(poll_s: float = 0.5) -> None:
    """End this (worker) process as soon as the process that started it is gone, even when that
    one was killed with SIGKILL: an idle pool worker would otherwise wait on its task queue
    forever, and keep multiprocessing's resource tracker alive with it.

    A daemon thread waits on the parent's sentinel (a pipe that reaches end-of-file when the parent
    dies: spawn and forkserver workers) and checks every ``poll_s`` seconds that the parent
    process id is unchanged (any start method).
    """
    ppid = os.getppid()
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None)

    def watch() -> None:
        nonlocal sentinel
        while True:
            if sentinel is not None:
                try:
                    if multiprocessing.connection.wait([sentinel], timeout=poll_s):
                        os._exit(1)
                except (OSError, ValueError):  # not a waitable handle here: poll the parent id only
                    sentinel = None
            else:
                threading.Event().wait(poll_s)
            if os.getppid() != ppid:
                os._exit(1)

    threading.Thread(target=watch, name="fm9g-exit-with-parent", daemon=True).start()


def _worker_read(d: int, epoch: int, k0: int, k1: int, part: tuple[int, int] | None = None) -> Lines:
    assert _WORKER_READER is not None, "worker_init did not run in this process"
    return _WORKER_READER.read(d, epoch, k0, k1, part)


class LineSource:
    """Per-dataset read-ahead of tokenized lines, in chunks, inline or on an executor.

    Args:
        reader: the iterating process's reader (used when ``executor`` is None).
        shard_lens: lines of this rank's (or ``part``'s) shard per dataset.
        executor: a process pool started with :func:`worker_init`, or None (read inline).
        chunk: lines per read task.
        ahead: chunks per dataset kept in flight (1 without an executor).
        part: ``(lane, lanes)``: read that lane's shard instead of the rank's.
    """

    def __init__(self, reader: Reader, shard_lens: list[int], executor: Executor | None, chunk: int, ahead: int,
                 part: tuple[int, int] | None = None):
        self.reader = reader
        self.part = part
        self.shard_lens = shard_lens
        self.executor = executor
        self.chunk = chunk
        self.ahead = ahead if executor is not None else 1
        self.pending: list[dict[tuple[int, int], Future | Lines]] = [{} for _ in shard_lens]

    def _submit(self, d: int, epoch: int, c: int) -> None:
        k0 = c * self.chunk
        k1 = min(k0 + self.chunk, self.shard_lens[d])
        if self.executor is None:
            self.pending[d][(epoch, c)] = self.reader.read(d, epoch, k0, k1, self.part)
        else:
            self.pending[d][(epoch, c)] = self.executor.submit(_worker_read, d, epoch, k0, k1, self.part)

    def get(self, d: int, epoch: int, k: int) -> tuple[int, list[TokenizedSample]]:
        """``(line id, windows)`` of shard index ``k`` of dataset ``d`` in ``epoch``."""
        c = k // self.chunk
        n_chunks = -(-self.shard_lens[d] // self.chunk)
        try:  # a dead worker surfaces in submit (pool already marked broken) or in result
            for cc in range(c, min(c + self.ahead, n_chunks)):
                if (epoch, cc) not in self.pending[d]:
                    self._submit(d, epoch, cc)
            item = self.pending[d][(epoch, c)]
            result = item.result() if isinstance(item, Future) else item
        except BrokenProcessPool as err:
            raise RuntimeError(
                "a MixtureLoader worker process ended unexpectedly: it was killed (e.g. out of memory) or "
                "failed while starting (its error, if any, is printed above; a script that starts workers "
                "needs the `if __name__ == \"__main__\":` guard); num_workers=0 reads in this process"
            ) from err
        if k == min((c + 1) * self.chunk, self.shard_lens[d]) - 1:  # last line of the chunk: forget it
            del self.pending[d][(epoch, c)]
            for key in [key for key in self.pending[d] if key[0] < epoch]:
                del self.pending[d][key]
        return result[k - c * self.chunk]

    def cancel(self) -> None:
        """Cancel the read tasks not started yet and forget every pending chunk."""
        for p in self.pending:
            for item in p.values():
                if isinstance(item, Future):
                    item.cancel()
            p.clear()
