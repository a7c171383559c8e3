"""True step times: what one training step took, without checkpointing, evaluation or inspection.

The loop marks when each step was launched and when its figures were read (settled), and wraps
the work between steps that is not training (a checkpoint, an evaluation, the parameter table)
in :meth:`StepClock.paused`. A step's time is the larger of

- the time since the previous step settled, and
- the time since the previous step was launched,

each less the paused time in between. The first is the step period when every step waits for the
one before; the second covers a step queued ahead of time (launch-ahead), whose host work fell in
the previous period, so the last step of a run is not counted short. ``clock`` is injectable: the
tests drive it with a fake clock.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["StepClock"]


class StepClock:
    """Times the steps of one ``fit``.

    Args:
        clock: a monotonic clock in seconds (default ``time.perf_counter``).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._settled = clock()
        self._launched: float | None = None
        self._paused = 0.0
        self.last_pause = 0.0

    def now(self) -> float:
        return self.clock()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is no step's time (checkpoints, evaluation, inspection); its length
        is kept in :attr:`last_pause`."""
        t = self.clock()
        try:
            yield
        finally:
            self.last_pause = self.clock() - t
            self._paused += self.last_pause

    def settled(self, launched_at: float) -> tuple[float, float]:
        """A step launched at ``launched_at`` has settled now: ``(iter_time, model_time)``.

        ``model_time`` runs from the launch to now (the step's own device time plus any wait).
        """
        now = self.clock()
        since_settle = now - self._settled - self._paused
        since_launch = launched_at - self._launched - self._paused if self._launched is not None else 0.0
        self._settled, self._launched, self._paused = now, launched_at, 0.0
        return max(since_settle, since_launch, 1e-9), now - launched_at
