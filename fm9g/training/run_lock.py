"""One writer per run folder: the lock a training run holds for its whole life.

``<run>/.fm9g-run.lock`` is a small JSON file ``{"host", "pid", "start", "heartbeat", "token"}``.
It is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFS v3 and later, the
shared file systems clusters use), so of two processes that start together exactly one gets it.
A thread rewrites the heartbeat every ``HEARTBEAT_S`` seconds (write to a temporary file, then
``os.replace``). A lock is stale, and is taken over with a line saying so, when its process is
known dead (same host, no such pid) or its heartbeat is older than ``STALE_AFTER_S`` (another
host: a machine that died or lost the file system). Taking over renames the stale file away first,
so of two processes taking over the same stale lock only one wins.

A second writer is refused at once with :class:`RunLockedError`, naming the folder and the holder.
Under torchrun rank 0 holds the lock for the job (:func:`acquire_for_run`).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from fm9g._io import ConfigError

__all__ = ["LOCK_NAME", "HEARTBEAT_S", "STALE_AFTER_S", "RunLock", "RunLockedError", "read_lock", "acquire_for_run"]

LOCK_NAME = ".fm9g-run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


class RunLockedError(ConfigError):
    """Another live process holds the run folder's lock."""


def _now_text(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def read_lock(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record of ``<run_dir>/.fm9g-run.lock`` (None: no lock, or one being written)."""
    try:
        data = json.loads((Path(run_dir) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_reason(holder: dict[str, Any], *, now: float | None = None, stale_after: float = STALE_AFTER_S) -> str | None:
    """Why a holder record is stale (its process is gone, or its heartbeat stopped), or None when it is live."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return f"process {holder.get('pid')} on this host ({holder.get('host')}) is not running"
    age = now - float(holder.get("heartbeat", 0))
    if age > stale_after:
        return f"its last heartbeat was {age:.0f} s ago (more than {stale_after:.0f} s)"
    return None


def describe_holder(holder: dict[str, Any]) -> str:
    """``host h, pid p, started <time>, last heartbeat <n> s ago``."""
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {_now_text(float(holder.get('start', 0)))}, "
            f"last heartbeat {age:.0f} s ago")


class RunLock:
    """The lock of one run folder (a context manager; :meth:`acquire` / :meth:`release` by hand too).

    Args:
        run_dir: ``<save>/<model_unique>`` (made when missing).
        say: where the takeover line goes (default: print).
        heartbeat_s / stale_after_s: heartbeat period and the age after which a lock is stale.
    """

    def __init__(self, run_dir: str | os.PathLike, *, say: Callable[[str], None] | None = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.say = say or (lambda msg: print(msg, flush=True))
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.record: dict[str, Any] | None = None
        self._made: list[Path] = []  # folders acquire made (removed again by release when left empty)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or a stale one over (saying so); raise :class:`RunLockedError` when a live
        process holds it."""
        self._make_run_dir()
        t = time.time()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "start": t, "heartbeat": t,
                  "token": uuid.uuid4().hex}
        for _ in range(3):
            if self._create(record):
                self.record = record
                self._start_heartbeat()
                return
            holder = read_lock(self.run_dir)
            if holder is None:  # being written by its creator, or just released: look again
                time.sleep(0.05)
                holder = read_lock(self.run_dir)
                if holder is None:
                    continue
            why = stale_reason(holder, stale_after=self.stale_after_s)
            if why is None:
                raise RunLockedError(
                    f"run folder {self.run_dir} is in use by another training run ({describe_holder(holder)}); "
                    f"wait for it to finish or stop it, or train into another folder (model_unique / save). "
                    f"If that process is surely gone, delete {self.path}")
            self._break_stale(holder, why)
        raise RunLockedError(f"could not take the lock {self.path} (it changed hands while trying); try again")

    def _make_run_dir(self) -> None:
        missing, p = [], self.run_dir
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._made = missing  # innermost first

    def _create(self, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _break_stale(self, holder: dict[str, Any], why: str) -> None:
        """Move a stale lock aside (one process wins the rename) and say so."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first; the next try sees its lock
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != holder.get("token"):  # a new holder's lock, not the stale one: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        self.say(f"taking over the stale lock of run folder {self.run_dir} ({describe_holder(holder)}): {why}")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="fm9g-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Rewrite the heartbeat time (only while the file is still this process's lock)."""
        if self.record is None or (read_lock(self.run_dir) or {}).get("token") != self.record["token"]:
            return
        self.record["heartbeat"] = time.time()
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.record['token'][:8]}.tmp")
        try:
            tmp.write_text(json.dumps(self.record), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full or unreachable disk: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.record is not None and (read_lock(self.run_dir) or {}).get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)
        self.record = None
        for folder in self._made:  # a run refused before it wrote anything leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (the run wrote into it) or gone
        self._made = []


def acquire_for_run(run_dir: Path | None, *, is_main: bool, agree: Callable[[float], float],
                    say: Callable[[str], None] | None = None) -> RunLock | None:
    """Rank 0 takes the run folder's lock for the job; every rank learns whether it did.

    Args:
        run_dir: the run folder (None: no checkpoints, nothing to lock).
        is_main: this is rank 0.
        agree: ``agree(x)`` -> the sum of ``x`` over the ranks (``lambda x: x`` in one process).
    Returns:
        The held lock on rank 0, None elsewhere.
    Raises:
        RunLockedError: on every rank, when rank 0 could not take the lock.
    """
    if run_dir is None:
        return None
    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(run_dir, say=say)
            lock.acquire()
        except RunLockedError as err:
            lock, error = None, err
    if agree(1.0 if error is not None else 0.0) > 0:
        raise error or RunLockedError(f"run folder {run_dir} is in use by another training run (rank 0 says so)")
    return lock
