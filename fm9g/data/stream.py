"""The global data stream of a mixture: rows in one order, read by any number of ranks.

A mixture is ``K`` *lanes*, ``K`` = the rows per optimizer step of the run that started it
(``world_size x batch_size x grad_accum``). Lane ``l`` is a mixer and a one-row packer
(:class:`fm9g.data.producer.Producer`) over part ``l`` of ``K`` of every dataset
(:mod:`fm9g.data.order`), with random numbers keyed by ``(seed, l)``: nothing in it depends on the
ranks. Row ``j`` of the stream is row ``j // K`` of lane ``j % K``.

Each optimizer step takes the next ``N = W x B x G`` rows of the stream; micro-batch ``g`` of rank
``r`` holds rows ``c + (r * G + g) * B + b`` for ``b < B`` (``c``: the rows of the steps before),
so the ranks' slices are disjoint and together are the step's rows.

* ``N == K`` (the global batch of the run that started the stream, on any W / B / G): every rank
  reads whole lanes, always the same ``B x G`` of them, and each step trains on exactly the rows
  of the uninterrupted run.
* ``N != K`` (the global batch changed): the rows still follow in the same order, none repeated or
  skipped, but a lane is read by several ranks in turn; a rank makes (reads and tokenizes) the rows
  of each lane it reads up to the one it needs, so each rank does up to W times the data work.

A lane that has ended gives rows of padding; a rank's iteration ends at a micro-batch of padding
only. The state layout is in :mod:`fm9g.data.loader_state`; docs/mixture.md has the rules.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from fm9g.data.loader_state import MixtureStateError, lane_rows_before
from fm9g.data.packing import stack_rows
from fm9g.data.producer import MixPlan, Producer
from fm9g.data.reader import LineSource

__all__ = ["Layout", "StreamState", "RankStream"]


@dataclass(frozen=True)
class Layout:
    """How this process reads the stream: its rank of ``world_size``, rows per micro-batch and
    micro-batches per optimizer step."""

    world_size: int
    rank: int
    batch_size: int
    grad_accum: int

    @property
    def rows_per_step(self) -> int:
        """``N = world_size x batch_size x grad_accum``: rows of the stream per optimizer step."""
        return self.world_size * self.batch_size * self.grad_accum

    def rows(self, start: int, k: int) -> range:
        """The stream rows of this rank's micro-batch ``k``, counted from row ``start``."""
        step, g = divmod(k, self.grad_accum)
        first = start + step * self.rows_per_step + (self.rank * self.grad_accum + g) * self.batch_size
        return range(first, first + self.batch_size)

    def consumed(self, start: int, k: int) -> int:
        """Rows of the stream all ranks have consumed after ``k`` micro-batches each from ``start``
        (after whole steps; with one rank also within a step)."""
        step, g = divmod(k, self.grad_accum)
        return start + step * self.rows_per_step + (g * self.batch_size if self.world_size == 1 else 0)

    def own_lanes(self, num_lanes: int, start: int) -> list[int] | None:
        """The lanes this rank reads when it always reads the same ones (``N == K`` and ``start``
        at a step boundary of the lanes), else None (it may read any lane)."""
        if self.rows_per_step != num_lanes or start % num_lanes:
            return None
        first = self.rank * self.grad_accum * self.batch_size
        return list(range(first, first + self.grad_accum * self.batch_size))


@dataclass(kw_only=True)
class StreamState:
    """Where this rank stands in the stream.

    Attributes:
        num_lanes: K.
        start: the stream row where this layout began (0, or the row a resume continued from).
        micro_batches: micro-batches handed out since ``start``.
        finished: the last micro-batch was padding only (the data ended for this rank).
        lanes: the own state of each lane this rank holds (format ``fm9g.mixture/1``; its
            ``batches`` are the rows the lane made), after the last micro-batch handed out.
        saved_layout: ``(world_size, batch_size, grad_accum)`` of the run whose state was loaded.
    """

    num_lanes: int
    start: int = 0
    micro_batches: int = 0
    finished: bool = False
    lanes: dict[int, dict[str, Any]] = field(default_factory=dict)
    saved_layout: tuple[int, int, int] | None = None

    def copy(self) -> "StreamState":
        """A snapshot (the lanes' states are never changed in place, so the dict is copied shallowly)."""
        return StreamState(num_lanes=self.num_lanes, start=self.start, micro_batches=self.micro_batches,
                           finished=self.finished, lanes=dict(self.lanes), saved_layout=self.saved_layout)


class _Lane:
    """One lane's producer, made from the lane's state on first use; :meth:`next_row` makes its next row."""

    def __init__(self, plan: MixPlan, state: dict[str, Any], source: LineSource) -> None:
        self.state = state
        self.source = source
        self._run = Producer(plan, state, source).run()
        self.done = bool(state["finished"])

    @property
    def rows(self) -> int:
        return int(self.state["batches"])

    def next_row(self) -> dict[str, Any] | None:
        """The lane's next row (a one-row batch), or None when the lane has ended."""
        if self.done:
            return None
        for batch, snap in self._run:
            self.state = snap
            if batch is not None:
                return batch
        self.done = True
        return None


class RankStream:
    """Makes this rank's micro-batches from the lanes; :meth:`run` yields ``(batch, state after it)``.

    Args:
        plan_of: the :class:`MixPlan` of lane ``l`` (part ``l`` of ``num_lanes``, one row per batch).
        source_of: a new :class:`LineSource` for a lane's plan.
        layout: this rank's :class:`Layout`.
        state: where to start (not changed; :meth:`run` yields new snapshots).
        task_names: put into every batch.
        keep: lanes kept running at once; others are put back to their state and made again from it.
    """

    def __init__(self, plan_of: Callable[[int], MixPlan], source_of: Callable[[int, MixPlan], LineSource],
                 layout: Layout, state: StreamState, task_names: list[str], keep: int) -> None:
        self.plan_of, self.source_of, self.layout = plan_of, source_of, layout
        self.state = state.copy()
        self.task_names = task_names
        self.keep = max(keep, layout.batch_size)
        self.live: OrderedDict[int, _Lane] = OrderedDict()

    def run(self) -> Iterator[tuple[dict[str, Any] | None, StreamState]]:
        """Yield each micro-batch with the state after it; the last item is ``(None, final state)``
        when the data ended for this rank."""
        st = self.state
        try:
            while not st.finished:
                rows = [self._row(j) for j in self.layout.rows(st.start, st.micro_batches)]
                if all(r is None for r in rows):
                    st.finished = True
                    yield None, st.copy()
                    return
                st.micro_batches += 1
                batch = stack_rows(rows, self.plan_of(0).max_length)
                batch["task_names"] = list(self.task_names)
                yield batch, st.copy()
        finally:
            self.cancel()

    def _row(self, j: int) -> dict[str, Any] | None:
        """Row ``j`` of the stream (None: its lane has ended), made by advancing its lane."""
        k = self.state.num_lanes
        lane_id, t = j % k, j // k
        lane = self._lane(lane_id)
        if lane.rows > t:  # the rows of a rank only go forward: a lane is never asked for an older row
            raise RuntimeError(f"lane {lane_id} is at row {lane.rows}, past the row {t} asked for")
        row = None
        while lane.rows <= t:
            row = lane.next_row()
            if row is None:
                break
        self.state.lanes[lane_id] = lane.state
        return row

    def _lane(self, lane_id: int) -> _Lane:
        """The running lane ``lane_id`` (made from its state; the least recently used beyond ``keep`` stop)."""
        lane = self.live.get(lane_id)
        if lane is not None:
            self.live.move_to_end(lane_id)
            return lane
        state = self.state.lanes.get(lane_id)
        if state is None:
            raise MixtureStateError(
                f"the loader state holds no lane {lane_id} of the stream's {self.state.num_lanes}: load the "
                "state_dict() of every rank of the run that saved it (load_state_dict([state_0, state_1, ...]))")
        plan = self.plan_of(lane_id)
        lane = self.live[lane_id] = _Lane(plan, state, self.source_of(lane_id, plan))
        while len(self.live) > self.keep:
            _, old = self.live.popitem(last=False)
            old.source.cancel()
        return lane

    def cancel(self) -> None:
        """Stop every running lane's read-ahead."""
        for lane in self.live.values():
            lane.source.cancel()
        self.live.clear()


def fresh_state(num_lanes: int, lanes: list[int], initial_of: Callable[[int], dict[str, Any]]) -> StreamState:
    """The state of a new stream of ``num_lanes`` lanes, holding ``lanes`` at their start."""
    return StreamState(num_lanes=num_lanes, lanes={lane: initial_of(lane) for lane in lanes})


def resumed_state(num_lanes: int, rows: int, merged: dict[int, dict[str, Any]], layout: Layout,
                  saved_layout: tuple[int, int, int]) -> StreamState:
    """The state of a rank of ``layout`` continuing at stream row ``rows`` from the ``merged``
    lanes of all saving ranks (:func:`fm9g.data.loader_state.merge_lanes`): only its own lanes
    when it always reads the same ones, else all.

    Raises:
        MixtureStateError: a lane this rank reads is missing or behind ``rows`` (the states of
            some ranks were not given).
    """
    own = layout.own_lanes(num_lanes, rows)
    needed = own if own is not None else list(range(num_lanes))
    for lane in needed:
        st = merged.get(lane)
        if st is None or (st["batches"] < lane_rows_before(rows, lane, num_lanes) and not st["finished"]):
            got = "no state" if st is None else f"a state at its row {st['batches']}"
            raise MixtureStateError(
                f"lane {lane} of the stream has {got}, but the stream stands at row {rows} (lane {lane} there: "
                f"row {lane_rows_before(rows, lane, num_lanes)}): load the state_dict() of every rank of the run "
                "that saved it, all from the same step (load_state_dict([state_0, state_1, ...]))")
    return StreamState(num_lanes=num_lanes, start=rows, lanes={lane: copy.deepcopy(merged[lane]) for lane in needed},
                       saved_layout=saved_layout)


def resume_note(state: StreamState, layout: Layout) -> str | None:
    """What a resume does with the data, in one sentence for the run header (None: nothing to say,
    the same layout)."""
    saved = state.saved_layout
    now = (layout.world_size, layout.batch_size, layout.grad_accum)
    k, n = state.num_lanes, layout.rows_per_step
    if saved == now and n == k:
        return None
    shape = f"{'x'.join(map(str, saved or ()))} -> {'x'.join(map(str, now))} (world_size x batch_size x grad_accum)"
    if n == k and state.start % k == 0:
        return (f"data: the same global batch of {k} rows per step on another layout, {shape}: every step trains on "
                f"the rows of the uninterrupted run, from row {state.start} of the stream")
    why = (f"the global batch changed to {n} rows per step (the stream was started with {k})" if n != k else
           f"the stream stands at row {state.start}, not at a multiple of its {k} lanes (the global batch changed before)")
    return (f"data: {why}, {shape}: the stream continues at row {state.start}, no row repeated or skipped, but the "
            "steps group the rows differently from the uninterrupted run, and each rank makes the rows of every lane "
            "it reads up to the one it needs (more tokenizing; resuming with world_size x batch_size x grad_accum = "
            f"{k} at a multiple of {k} rows avoids both)")
