"""Interrupts and preemption: SIGINT (Ctrl-C) and SIGTERM (Slurm preemption, ``kill``) during ``fit``.

The first signal only asks the loop to stop: the step in hand finishes, a checkpoint of it is
written (``save_on_interrupt``, default on), one line says where it is and how to resume, and the
command exits with the signal's code (130 for SIGINT, 143 for SIGTERM). A second signal raises
:class:`RunInterrupted` at once; a save it cuts leaves the previous checkpoint whole (checkpoints are
written into a temporary folder and renamed at the end) and the message says the save was cut.

Handlers are installed only in the main thread (Python delivers signals there) and the previous
handlers are restored when ``fit`` ends.
"""
from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Callable

__all__ = ["RunInterrupted", "StopSignals", "exit_code", "signal_name"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 128 + signum (130, 143)."""
    return 128 + int(signum)


class RunInterrupted(BaseException):
    """A second SIGINT / SIGTERM stopped the run at once (a BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` swallows it).

    Attributes:
        signum: the signal; ``exit_code`` = 128 + signum.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class StopSignals:
    """While entered, SIGINT and SIGTERM set :attr:`signum` (the loop stops after the step in
    hand); a second one raises :class:`RunInterrupted`.

    Args:
        say: called with the line announcing the stop (the Trainer's logger).
        where: returns a short text of where the run is (``"at step 12"``), for that line.
    """

    def __init__(self, say: Callable[[str], None], where: Callable[[], str]) -> None:
        self.say, self.where = say, where
        self.signum: int | None = None
        self.group: Any = None  # with several ranks: the process group the stop flag is agreed on
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """A signal asked the run to stop."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal_name(signum)
        if self.signum is not None:
            raise RunInterrupted(f"{name} received again: stopping at once {self.where()}", signum)
        self.signum = signum
        self.say(f"{name} received {self.where()}: finishing the step in hand, then saving and stopping "
                 f"(send it again to stop at once; the last checkpoint stays whole)")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for s, handler in self._previous.items():
            if exc_type is not None and s == signal.SIGTERM and os.environ.get("TORCHELASTIC_RUN_ID"):
                # an error on its way out under torchrun (another rank died, say): torchrun SIGTERMs the
                # survivors at once, and the default handler would kill this one before the error's line
                # reaches the log (torchrun's SIGKILL after its grace period still ends it)
                handler = signal.SIG_IGN
            signal.signal(s, handler)
        self._previous.clear()
