"""True step times: what one training step took, without checkpointing, evaluation or inspection.

The loop marks when each step was launched and when its figures were read (settled), and wraps
the work between steps that is not training (a checkpoint, an evaluation, the parameter table)
in :meth:`StepClock.paused`. A step's time is, less the paused time in between:

- when the next step is queued already (launch-ahead): from this step's launch to the next's;
- when this step was queued ahead but the next is not (the last step, a step before a
  checkpoint): the larger of the time since the previous step settled and the time between the
  two launches (the host work of a queued step fell in the previous interval, so the first alone
  would count it short when the host is the bottleneck);
- otherwise: the time since the previous step settled (the start of the loop for the first).

So the step after a checkpoint is not charged with the save and the last step is not counted
short. ``clock`` is injectable: the tests drive it with a fake clock.
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

    def settled(self, launched_at: float, next_launched_at: float | None = None) -> tuple[float, float]:
        """A step launched at ``launched_at`` has settled now: ``(iter_time, model_time)``.

        Args:
            launched_at: when this step was launched (:meth:`now` just before the launch).
            next_launched_at: when the next step was launched, if it is queued already.
        Returns:
            ``iter_time`` (see the module text) and ``model_time``, from the launch to now.
        """
        now = self.clock()
        since_settle = now - self._settled - self._paused
        if next_launched_at is not None:  # nothing is paused between two queued steps
            iter_time = next_launched_at - launched_at
        elif self._launched is not None and launched_at < self._settled:  # this step was queued ahead
            iter_time = max(since_settle, launched_at - self._launched - self._paused)
        else:
            iter_time = since_settle
        self._settled, self._launched, self._paused = now, launched_at, 0.0
        return max(iter_time, 1e-9), now - launched_at
