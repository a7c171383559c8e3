"""What ``Trainer.fit`` holds for the life of a run: the run folder's lock and the stop signals.

:func:`guard_run` takes the lock (rank 0, :mod:`fm9g.training.run_lock`) and installs the SIGINT /
SIGTERM handlers (:mod:`fm9g.training.interrupts`); :func:`stop_agreed` is the loop's question
"stop after this step?" (every rank gets the same answer); :func:`finish_interrupted` saves the
step in hand and prints the one line that says where the checkpoint is and how to resume.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from fm9g.training.interrupts import RunInterrupted, StopSignals
from fm9g.training.run_lock import acquire_for_run

if TYPE_CHECKING:
    from fm9g.training.trainer import Trainer

__all__ = ["guard_run", "stop_agreed", "stop_now", "finish_interrupted", "DEFAULT_RESUME_HINT"]

DEFAULT_RESUME_HINT = "resume_ckpt=\"latest\" in the same config"


def _say(trainer: Trainer, msg: str) -> None:
    if not trainer.engine.is_main:
        return
    if trainer.logger is not None:
        trainer.logger.print(msg)
    else:
        print(msg, file=trainer.log_stream, flush=True)


def _where(trainer: Trainer) -> str:
    return f"during step {trainer.step + 1} (last completed: {trainer.step})"


@contextmanager
def guard_run(trainer: Trainer) -> Iterator[StopSignals]:
    """Hold the run folder's lock and the stop signals while the block runs.

    Raises:
        RunLockedError: another live process holds the run folder (nothing of it was touched).
        RunInterrupted: a second signal; its message names the last whole checkpoint.
    """
    eng = trainer.engine
    lock = acquire_for_run(trainer.config.run_dir, is_main=eng.is_main,
                           agree=lambda x: eng.all_reduce({"locked_out": x})["locked_out"],
                           say=lambda msg: _say(trainer, msg))
    try:
        with StopSignals(say=lambda msg: _say(trainer, msg), where=lambda: _where(trainer)) as stop:
            stop.group = _host_group(eng.world_size)
            try:
                yield stop  # the Trainer keeps it as its _stop while the block runs
            except BaseException as err:
                cut = _interrupt_in(err)
                if cut is None:
                    raise
                raise RunInterrupted(_cut_message(trainer, err, cut), cut.signum) from None
            finally:
                _drop_group(stop.group)
    finally:
        if lock is not None:
            lock.release()


def _interrupt_in(err: BaseException) -> RunInterrupted | None:
    """The :class:`RunInterrupted` that `err` is, or was raised while handling (torch.save turns an
    interrupted write into a RuntimeError while closing the file), else None."""
    seen = 0
    e: BaseException | None = err
    while e is not None and seen < 8:
        if isinstance(e, RunInterrupted):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _cut_message(trainer: Trainer, err: BaseException, cut: RunInterrupted) -> str:
    """The message of a run stopped by a second signal: what was cut and what is whole."""
    last = trainer.last_checkpoint
    if last is None and trainer.config.run_dir is not None:
        from fm9g.training.checkpoint import latest_checkpoint

        last = latest_checkpoint(trainer.config.run_dir)
    whole = f"the last whole checkpoint is {last}" if last is not None else "no checkpoint was written"
    saving = " (the checkpoint being saved was interrupted and is not kept)" if _in_save(err) else ""
    return f"{cut}{saving}; {whole}; resume with: {trainer.resume_hint}"


def _in_save(err: BaseException) -> bool:
    """Whether `err` was raised inside a checkpoint save."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "save_checkpoint":
            return True
        tb = tb.tb_next
    return False


def _host_group(world_size: int) -> Any:
    """A gloo process group over the ranks for the stop flag (None in one process, or without
    torch.distributed, as under bmtrain): its all-reduce is a few bytes between the hosts and never
    waits for the GPU, so asking every step does not stall the steps queued on the device."""
    import torch.distributed as dist

    if world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo")


def _drop_group(group: Any) -> None:
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group(group)


def stop_agreed(trainer: Trainer) -> bool:
    """Whether the loop stops after the step in hand: a signal asked for it on any rank. With
    several ranks, one all-reduce of a flag per step on a CPU (gloo) group, which never waits for
    the device (the engine's own all-reduce where there is no torch.distributed group)."""
    stop = trainer._stop
    asked = 1.0 if stop is not None and stop.requested else 0.0
    if trainer.engine.world_size > 1:
        group = getattr(stop, "group", None)
        if group is not None:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([asked])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            asked = float(flag[0])
        else:
            asked = trainer.engine.all_reduce({"stop": asked}, op="max")["stop"]
    return asked > 0


def stop_now(trainer: Trainer, result: Any, *, nothing_in_hand: bool) -> bool:
    """Whether the loop stops after the step just settled: a signal asked for it and no batches
    are in hand (none fetched or queued ahead, so the saved data position is exact). Marks
    `result` (``stop_reason "interrupted"``, ``signal``). Every rank gets the same answer."""
    asked = trainer._stopping or (trainer.engine.world_size == 1 and stop_agreed(trainer))
    if not (nothing_in_hand and asked):
        return False
    result.stop_reason, result.signal = "interrupted", getattr(trainer._stop, "signum", None)
    return True


def finish_interrupted(trainer: Trainer) -> None:
    """After the loop stopped on a signal: save the step in hand (``save_on_interrupt``) unless it
    is saved already, and print the one line saying where it is and how to resume."""
    cfg = trainer.config
    saved = trainer.last_checkpoint is not None and trainer.last_checkpoint.name == str(trainer.step)
    if not saved and cfg.run_dir is not None and getattr(cfg, "save_on_interrupt", True) and trainer.step > 0:
        trainer.save()
        saved = True
    if saved:
        where = f"checkpoint {trainer.last_checkpoint}; resume with: {trainer.resume_hint}"
    else:
        why = ("save is off" if cfg.run_dir is None else "save_on_interrupt is false" if trainer.step > 0
               else "no step completed")
        last = trainer.last_checkpoint
        where = f"no checkpoint of it was written ({why})" + (
            f"; the last checkpoint is {last}; resume with: {trainer.resume_hint}" if last is not None else "")
    _say(trainer, f"interrupted at step {trainer.step}; {where}")
