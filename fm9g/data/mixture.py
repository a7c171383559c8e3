"""Weighted multi-dataset mixing with per-rank shards and exact resume (docs/mixture.md).

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
  last partial batch is flushed. Each dataset drops out exactly once (the original could count
  one dataset twice and stop early).

One global stream (:mod:`fm9g.data.stream`): the mixture is ``K`` lanes, ``K = world_size x
batch_size x grad_accum`` rows per optimizer step of the run that starts it; lane ``l`` mixes and
packs rows on its own, reading part ``l`` of ``K`` of every dataset, and row ``j`` of the stream is
row ``j // K`` of lane ``j % K``. Each optimizer step takes the next ``world_size x batch_size x
grad_accum`` rows, and rank ``r`` reads its slice of them.

Sharding: in epoch ``e`` dataset *i* is read in the order of a pseudo-random permutation of its
lines keyed by ``(seed, task_name, e)`` (a Feistel network: nothing is stored, any position is
computed on demand). Lane ``l`` of ``K`` reads positions ``l, l+K, l+2K, ...``: the lanes' line
sets are disjoint and together cover the dataset once per epoch. A dataset with fewer lines than
ranks is an error unless it repeats; then lane ``l`` reads line position ``l mod nlines`` (a
non-repeating dataset with fewer lines than lanes gives the lanes ``l >= nlines`` none).

Resume: :meth:`MixtureLoader.state_dict` is a small dict of tensors and plain values (per lane
this rank reads and per dataset: epoch, lines read, windows of the current long document handed
out, tokens and samples drawn; the lane's mixer step — its random numbers are a function of
``(seed, lane, step)``; the pending row; statistics; and the stream row the ranks stand at). It
describes the position after the last batch handed to the caller, even when background workers
have prepared more. :meth:`MixtureLoader.load_state_dict` takes it, or the list of every rank's
states, on any number of ranks: with the same global batch the loader yields exactly the rows the
uninterrupted run would have trained on next; with another global batch it continues the stream
from the first unconsumed row (:attr:`MixtureLoader.resume_note` says which).

Background work (``num_workers > 0``): a thread runs the mixer and packer and ``num_workers``
spawned processes read, transform and tokenize lines ahead (the same lines in the same order
as without workers, so the batches are identical for any ``num_workers``).

The parts live in their own modules: :mod:`fm9g.data.entries` (the entry schema),
:mod:`fm9g.data.order` (the line order), :mod:`fm9g.data.reader` (reading and worker
processes), :mod:`fm9g.data.producer` (mixer and packer), :mod:`fm9g.data.loader_state` (the
state layout); this module holds the loader and re-exports the public names.
"""
from __future__ import annotations

import ast
import copy
import multiprocessing
import queue
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fm9g._io import nearby_hint
from fm9g.data.entries import DatasetEntry, MixtureConfigError, load_dataset_config
from fm9g.data.loader_state import (
    STATE_FORMAT, STREAM_FORMAT, MixtureStateError, Position, check_compatible, check_stream_compatible, merge_lanes,
    pack_lanes, unpack_lanes,
)
from fm9g.data.producer import MixPlan, Producer
from fm9g.data.reader import LineSource, Reader, ReaderSpec, worker_init
from fm9g.data.stream import Layout, RankStream, StreamState, fresh_state, resume_note, resumed_state
from fm9g.data.records import is_chat_record
from fm9g.data.tokenizers import load_tokenizer
from fm9g.data.transforms import load_transform

__all__ = [
    "DatasetEntry",
    "MixtureConfigError",
    "MixtureStateError",
    "MixtureLoader",
    "load_dataset_config",
    "SAMPLERS",
]

SAMPLERS = ("deficit", "random")
_STOP = object()


class MixtureLoader:
    """Iterate packed batches drawn from several indexed datasets by weight (module docstring).

    Args:
        entries: the dataset config (see :func:`load_dataset_config`).
        tokenizer: a Hugging Face tokenizer (a fast one for speed; must be picklable when
            ``num_workers > 0``), or a local tokenizer path for
            :func:`fm9g.data.tokenizers.load_tokenizer` (a directory, ``tokenizer.json``, a
            sentencepiece ``.model`` or the FM9G-8B ``vocab.txt``).
        max_length: row length L of a packed batch (and the longest sample).
        batch_size: rows B per batch.
        seed: seeds the line order of every epoch and the lanes' mixers (the same stream on any ranks).
        rank / world_size: this process's data-parallel rank and the number of ranks.
        grad_accum: micro-batches per optimizer step (a step takes ``world_size x batch_size x
            grad_accum`` rows of the stream; rank ``r`` reads its slice, one micro-batch at a time).
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
        trust_remote_code: let a tokenizer directory given as a path run the Python code it
            ships (``auto_map``: the FM9G 4B / 7B / 70B folders). Off by default: such a folder is
            refused with a message naming this option.
        holdout: ``eval_split``: the share of each dataset's lines held out of training, the same
            lines on every run, rank and resume (:mod:`fm9g.data.split`); 0 = none.
        split: with ``holdout``, which side this loader reads: ``"train"`` (default) or ``"eval"``.

    Raises:
        MixtureConfigError: bad entries, a missing index / transform, or a record that the
            transform turns into something without ``output``; a non-repeating dataset with fewer
            lines than ``world_size``; bad rank / world size / sampler; abs_weight values whose
            shares cannot be computed (``1e308``).
        ConfigError: a tokenizer path that needs ``trust_remote_code`` (see
            :func:`fm9g.data.tokenizers.load_tokenizer`).
        RuntimeError: ``num_workers > 0`` with ``spawn`` / ``forkserver`` from a script without an
            ``if __name__ == "__main__":`` block (the workers would re-run the script). While
            iterating: a worker process that died (killed, out of memory).

    Workers exit by themselves when the process that started them dies (even by SIGKILL).

    Attributes:
        resume_note: what the last :meth:`load_state_dict` did with the data, in one sentence
            (another layout with the same global batch, or a changed global batch); None for a
            plain resume.
        resume_exact: False after a load with another global batch (the rows continue in order,
            but the steps group them differently from the uninterrupted run).

    Iterating yields the packer's batch dicts — ``input_ids`` / ``labels`` / ``position_ids`` /
    ``task_ids`` Long[B, L], ``cu_seqlens`` Int32[n+1], ``max_seqlen``, ``num_tokens``,
    ``num_label_tokens`` — plus ``task_names`` (list[str], indexed by ``task_ids``) and
    ``sample_lines`` Long[n, 2]: ``(task id, line id in the index)`` of each packed sample in
    packing order (a long document's windows repeat its line id).
    ``iter(loader)`` continues from the current state (fresh, loaded, or after the last batch
    yielded).
    """

    #: load_state_dict takes the list of every rank's state_dict() (the Trainer passes it on resume)
    loads_every_rank_state = True

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
        grad_accum: int = 1,
        num_workers: int = 0,
        prefetch: int = 8,
        sampler: str = "deficit",
        max_epochs: int | None = None,
        chunk_lines: int = 32,
        start_method: str = "spawn",
        base_dir: str | Path | None = None,
        trust_remote_code: bool = False,
        holdout: float = 0.0,
        split: str = "train",
    ) -> None:
        self.entries = load_dataset_config(list(entries), base_dir=base_dir)
        _check_settings(rank, world_size, sampler, max_epochs, max_length, batch_size, grad_accum)
        self.tokenizer = _load_tokenizer(tokenizer, trust_remote_code)
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
        if self.num_workers > 0 and start_method != "fork":
            _check_main_guard(self.num_workers, start_method)
        self.task_names = [e.task_name for e in self.entries]
        self._spec = ReaderSpec(
            entries=self.entries, tokenizer=self.tokenizer, max_length=self.max_length, seed=self.seed,
            rank=rank, world_size=world_size, holdout=float(holdout), split=split,
        )
        self._reader = _open_reader(self._spec)
        self.grad_accum = int(grad_accum)
        self._layout = Layout(world_size, rank, self.batch_size, self.grad_accum)
        self._nlines = _line_counts(self.entries, self._reader, world_size)
        # a per-rank mixture: only for states written before the global stream (fm9g.mixture/1)
        self._plan = self._mix_plan(rank, world_size, self.batch_size)
        self._lane_plans: dict[tuple[int, int], MixPlan] = {}
        _check_first_records(self.entries, self._reader)
        num_lanes = self._layout.rows_per_step
        lanes = self._layout.own_lanes(num_lanes, 0) or []
        self._state: dict[str, Any] | StreamState = fresh_state(num_lanes, lanes, self._initial_lane)
        self.resume_note: str | None = None
        self.resume_exact = True
        self._generation = 0
        self._executor: ProcessPoolExecutor | None = None

    def _mix_plan(self, part: int, parts: int, batch_size: int) -> MixPlan:
        return MixPlan.build(self.entries, self._nlines, seed=self.seed, rank=part, world_size=parts,
                             max_length=self.max_length, batch_size=batch_size, sampler=self.sampler,
                             max_epochs=self.max_epochs)

    def _lane_plan(self, lane: int, num_lanes: int) -> MixPlan:
        """The plan of lane ``lane`` of ``num_lanes``: part ``lane`` of every dataset, one row per batch."""
        key = (lane, num_lanes)
        if key not in self._lane_plans:
            self._lane_plans[key] = self._mix_plan(lane, num_lanes, 1)
        return self._lane_plans[key]

    def _initial_lane(self, lane: int) -> dict[str, Any]:
        return Position.initial(len(self.entries)).to_state(self._lane_plan(lane, self._layout.rows_per_step))

    @classmethod
    def from_config(
        cls,
        path_or_list: str | Path | Sequence[DatasetEntry | dict[str, Any]],
        tokenizer: Any,
        max_length: int,
        batch_size: int,
        *,
        base_dir: str | Path | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> "MixtureLoader":
        """Build a loader from a dataset-config JSON file (original format) or a list of entries.

        Relative ``path`` / ``transforms`` in a file are resolved against the file's directory
        (in a list of dicts, against ``base_dir``). ``trust_remote_code`` and the other keyword
        arguments (``seed``, ``rank``, ``world_size``, ``num_workers``, ...) are those of
        :class:`MixtureLoader`.
        """
        entries = load_dataset_config(path_or_list, base_dir=base_dir)
        return cls(entries, tokenizer, max_length, batch_size, trust_remote_code=trust_remote_code, **kwargs)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (tensors, ints, strings; ``weights_only``-safe).

        Save it with ``torch.save`` next to the model checkpoint (one file per rank); pass it (or
        the list of every rank's) to :meth:`load_state_dict`. The layout is described in
        :mod:`fm9g.data.loader_state`.
        """
        st = self._state
        if not isinstance(st, StreamState):
            return copy.deepcopy(st)
        lay = self._layout
        return {
            "format": STREAM_FORMAT, "seed": self.seed, "max_length": self.max_length, "sampler": self.sampler,
            "task_names": list(self.task_names), "nlines": torch.tensor(self._nlines, dtype=torch.int64),
            "num_lanes": st.num_lanes, "rows": lay.consumed(st.start, st.micro_batches),
            "world_size": lay.world_size, "rank": lay.rank, "batch_size": lay.batch_size,
            "grad_accum": lay.grad_accum, "micro_batches": st.micro_batches, "finished": st.finished,
            "lanes": pack_lanes(st.lanes),
        }

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Continue from ``state``: :meth:`state_dict` of a loader over the same datasets, or the list
        of the states of every rank of a run (saved at the same step), on any number of ranks,
        batch size and grad_accum.

        With the same global batch (``world_size x batch_size x grad_accum`` rows per step) the next
        batches hold exactly the rows the uninterrupted run would have trained on next; with
        another one the stream continues from its first unconsumed row, no row repeated or skipped
        (:attr:`resume_note` says which). A per-rank state of an older fm9g (``fm9g.mixture/1``)
        loads only on the rank and world size that saved it.

        Raises:
            MixtureStateError: the state comes from a different mixture (task names, line counts) or
                settings (seed, max_length, sampler); lanes of the stream are missing (pass every
                rank's state) or the states were saved at different steps — the message names the
                mismatch and what to do.
        """
        states = list(state) if isinstance(state, (list, tuple)) else [state]
        if not states:
            raise MixtureStateError("load_state_dict got an empty list: pass the state_dict() of every rank")
        per_rank = [st for st in states if isinstance(st, dict) and st.get("format") == STATE_FORMAT]
        if per_rank:  # an older fm9g's per-rank states: this rank's own, on the same world size only
            mine = next((st for st in per_rank if st.get("rank") == self.rank), per_rank[0])
            check_compatible(mine, self._plan)
            self._state, self.resume_note, self.resume_exact = copy.deepcopy(mine), None, True
            self._generation += 1
            return
        for st in states:
            check_stream_compatible(st, self._plan)
        lanes = [unpack_lanes(st["lanes"], lambda lane, k=int(st["num_lanes"]): self._lane_plan(lane, k)) for st in states]
        merged = merge_lanes(states, lanes)
        head = states[0]
        saved = (int(head["world_size"]), int(head["batch_size"]), int(head["grad_accum"]))
        self._state = resumed_state(int(head["num_lanes"]), int(head["rows"]), merged, self._layout, saved)
        self.resume_note = resume_note(self._state, self._layout)
        self.resume_exact = self._layout.own_lanes(self._state.num_lanes, self._state.start) is not None
        self._generation += 1

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        gen = self._generation
        if self.num_workers <= 0:
            return self._iter_inline(gen)
        return self._iter_background(gen)

    def _source(self, part: tuple[int, int] | None = None, shard_lens: list[int] | None = None) -> LineSource:
        executor = None
        if self.num_workers > 0:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.num_workers, mp_context=multiprocessing.get_context(self.start_method),
                    initializer=worker_init, initargs=(self._spec,),
                )
            executor = self._executor
        ahead = max(2, 2 * self.num_workers)
        if part is None:
            return LineSource(self._reader, self._plan.shard_lens, executor, self.chunk_lines, ahead)
        return LineSource(self._reader, shard_lens or [], executor, self.chunk_lines, ahead, part)

    def _runner(self, state: dict[str, Any] | StreamState) -> Any:
        """What makes the batches from ``state``: the rank's view of the stream, or (a per-rank
        state of an older fm9g) the rank's own mixture; its ``run()`` yields ``(batch, state)``."""
        if not isinstance(state, StreamState):
            return Producer(self._plan, state, self._source())
        k = state.num_lanes
        lay = self._layout
        return RankStream(lambda lane: self._lane_plan(lane, k),
                          lambda lane, plan: self._source((lane, k), plan.shard_lens),
                          lay, state, self.task_names, keep=2 * lay.batch_size * lay.grad_accum)

    def _iter_inline(self, gen: int) -> Iterator[dict[str, Any]]:
        for batch, snap in self._runner(self._state).run():
            if gen != self._generation:
                return
            self._state = snap
            if batch is not None:
                yield batch

    def _iter_background(self, gen: int) -> Iterator[dict[str, Any]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        runner = self._runner(self._state)

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
                for item in runner.run():
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
            runner.cancel()

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
        """Per task, counted over the rows of the lanes this rank reads (with one rank: the whole
        stream; a per-rank state of an older fm9g: this rank's batches), kept across resume.

        Returns:
            ``{task_name: {"samples", "tokens", "label_tokens", "dropped_lines", "drop_reasons", "epoch",
            "exhausted", "avg_tokens", "weight"}}`` — ``samples`` are packed sequences (documents or
            windows), ``tokens`` real (non-pad) tokens, ``dropped_lines`` lines read but skipped and
            ``drop_reasons`` those by reason (the transform returned None, empty output, prompt too
            long, ``oversize_rule="drop"``, no trained turn), ``epoch`` the current pass over this rank's shard (0-based),
            ``avg_tokens`` the running mean sample length the mixer uses, ``weight`` the
            normalised abs_weight (or weight x nlines). Over several lanes: the sums, the largest
            epoch, ``exhausted`` when every lane's share is used up.
        """
        st = self._state
        parts = list(st.lanes.values()) if isinstance(st, StreamState) else [st]
        return {name: self._plan.task_stats(parts, d) for d, name in enumerate(self.task_names)}

    @property
    def finished(self) -> bool:
        """True once the data ended for this rank (every dataset dropped out of the lanes it reads)
        and the last batch was handed out."""
        st = self._state
        return st.finished if isinstance(st, StreamState) else bool(st["finished"])

    def __repr__(self) -> str:
        return (
            f"MixtureLoader(tasks={self.task_names}, max_length={self.max_length}, batch_size={self.batch_size}, "
            f"grad_accum={self.grad_accum}, rank={self.rank}/{self.world_size}, num_workers={self.num_workers}, "
            f"sampler={self.sampler!r})"
        )


def _check_settings(
    rank: Any, world_size: Any, sampler: str, max_epochs: Any, max_length: int, batch_size: int, grad_accum: Any = 1
) -> None:
    """Raise :class:`MixtureConfigError` naming the first bad loader setting."""
    if not (isinstance(world_size, int) and world_size >= 1):
        raise MixtureConfigError(f"world_size must be an int >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise MixtureConfigError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if sampler not in SAMPLERS:
        raise MixtureConfigError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < 1):
        raise MixtureConfigError(f"max_epochs must be None or an int >= 1, got {max_epochs!r}")
    if not (isinstance(grad_accum, int) and grad_accum >= 1):
        raise MixtureConfigError(f"grad_accum must be an int >= 1, got {grad_accum!r}")
    if int(max_length) < 4 or int(batch_size) < 1:
        raise MixtureConfigError(f"need max_length >= 4 and batch_size >= 1, got {max_length}, {batch_size}")


def _check_main_guard(num_workers: int, start_method: str) -> None:
    """Refuse to start worker processes from a script without an ``if __name__ == "__main__":``
    block: a ``spawn`` / ``forkserver`` worker re-imports the main script, so each worker would
    run the script's code again and die while starting, with the reason only in its own stderr.

    The workers re-import what ``multiprocessing.spawn`` re-imports: the main script file or
    ``python -m`` module, except a package's ``__main__`` (``python -m fm9g``) and IPython.

    Raises:
        RuntimeError: the main module is re-imported and its top level has no ``if`` on
            ``__name__`` (naming the file and the two ways out).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if not path or (name is not None and (name == "__main__" or name.endswith(".__main__"))):
        return  # interactive, -c, a notebook, a package's __main__: nothing is re-imported
    if Path(path).stem == "ipython":
        return
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return
    for node in tree.body:
        if isinstance(node, ast.If) and any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(node.test)):
            return
    raise RuntimeError(
        f"num_workers={num_workers} starts worker processes with {start_method!r}, which re-imports the main "
        f"script {path}; it has no `if __name__ == \"__main__\":` block, so every worker would run the "
        f"script again. Put the script's code under `if __name__ == \"__main__\":`, or use num_workers=0"
    )


def _load_tokenizer(tokenizer: Any, trust_remote_code: bool) -> Any:
    """A tokenizer object as it is, or :func:`fm9g.data.tokenizers.load_tokenizer` of a path."""
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    return tokenizer


def _open_reader(spec: ReaderSpec) -> Reader:
    """Open every dataset and transform; each problem is an error now, not in the middle of training."""
    for e in spec.entries:
        p = Path(e.path).expanduser()
        if not p.is_dir():
            raise MixtureConfigError(
                f"task {e.task_name!r}: dataset path {p.resolve()} does not exist or is not a directory"
                f"{nearby_hint(p)}; build it with `fm9g build-index <data.jsonl> {p}` or fix 'path' in the "
                "dataset config (relative paths are resolved against its own folder)"
            )
        try:
            load_transform(e.transforms, None, e.task_name)
        except FileNotFoundError as err:
            raise MixtureConfigError(str(err)) from err
    try:
        return Reader(spec)
    except MixtureConfigError:
        raise
    except Exception as err:
        raise MixtureConfigError(f"cannot open the datasets: {err}") from err


def _line_counts(entries: list[DatasetEntry], reader: Reader, world_size: int) -> list[int]:
    """Each dataset's line count; an empty dataset, or a non-repeating one with fewer lines than
    ranks, is an error."""
    counts = []
    for d, e in enumerate(entries):
        n = reader.num_lines(d)
        if n == 0:
            raise MixtureConfigError(f"task {e.task_name!r}: dataset {e.path} has no lines")
        if n < world_size and not e.allow_repeat:
            raise MixtureConfigError(
                f"task {e.task_name!r}: dataset {e.path} has {n} line(s), fewer than world_size={world_size}, "
                f"and allow_repeat is false, so some ranks would get no data; set \"allow_repeat\": true "
                f"or use fewer ranks"
            )
        counts.append(n)
    return counts


def _check_first_records(entries: list[DatasetEntry], reader: Reader) -> None:
    """Run each dataset's transform on its first line: a missing field fails now, clearly."""
    for d, e in enumerate(entries):
        try:
            sample = reader.transformed(d, 0, 0)
        except Exception as err:
            raise MixtureConfigError(f"task {e.task_name!r}: transform failed on line 0: {err}") from err
        if sample is not None and (e.chat_template or is_chat_record(sample)):
            reader.tokenize(d, [0], [sample])  # the template exists and renders: fail now, naming the line
            continue
        if sample is not None and not isinstance(sample.get("output"), str):
            data = reader.datasets[d][0]
            raise MixtureConfigError(
                f"task {e.task_name!r}: line 0 of {e.path} has no string field 'output' after the transform "
                f"{e.transforms or 'identity'!r} (record keys: {sorted(data)}; transformed keys: "
                f"{sorted(sample)}); write {{'input': ..., 'output': ...}} records or a transform that makes them"
            )
