"""Learning-rate schedules, as pure functions of the 1-based iteration number.

Timing (a deliberate fix of the original): iteration ``k`` (1, 2, ..., the k-th optimizer step)
trains with ``lr(k)``, and ``lr(k)`` is also what is logged for that iteration. The original built
its scheduler at step 0 and stepped it after each update, so its first iteration trained with
``lr(0) = 0`` under warmup and the logged lr was one step ahead of the one used. Here ``lr(1) =
base/W`` under a warmup of W steps and ``lr(W) = base``.

With ``W`` = warmup steps, ``D`` = drop steps, ``E`` = train_iters (W and D may be given as
fractions of E in the config; they are resolved to (fractional) step counts before this module),
``base`` = the group's learning rate:

- warmup (all schedules, when W > 0): ``k < W`` -> ``base * k / W``.
- ``cosine``: ``p = min(1, (k - W) / max(1, E - W))``,
  ``lr = max(0.1 base, base * (0.1 + 0.45 * (1 + cos(pi p))))``: from base down to a 0.1·base
  floor at E, and the floor after.
- ``warmupstabledrop`` (WSD): ``base`` until ``E - D``; for ``k > E - D``:
  ``base * (0.1 + max(0.9 * (E - k) / D, 0))`` (linear drop to 0.1·base at E).
- ``warmupstableexp``: ``base``; after ``drop_begin`` (>= 0) with D > 0:
  ``base * drop_rate ** ((k - drop_begin) / D)`` (D is the half-life when drop_rate = 0.5).
- ``linear``: ``base * (E - k + 1) / (E - S + 1)`` for ``k >= S = max(W, 1)``: base at S,
  ``base/(E-S+1)`` at the last step (never 0 for a step that trains), 0 after E.
- ``constant``: ``base``.

Names are case-insensitive (``"Cosine"`` works; the original crashed on it).
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["lr_at", "SCHEDULERS", "normalise_name", "schedule_text", "schedule_warnings"]

SCHEDULERS = ("cosine", "warmupstabledrop", "warmupstableexp", "linear", "constant")


def normalise_name(name: str) -> str:
    """``"Cosine"`` / ``"warmup-stable-drop"`` / ``"WSD"`` -> the canonical scheduler name."""
    n = name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    n = {"wsd": "warmupstabledrop", "wse": "warmupstableexp", "cos": "cosine"}.get(n, n)
    if n not in SCHEDULERS:
        raise ValueError(f"lr_scheduler {name!r} is not one of {list(SCHEDULERS)}")
    return n


def lr_at(
    step: int,
    base_lr: float,
    *,
    scheduler: str = "cosine",
    warmup_iters: float = 0.0,
    drop_iters: float = 0.0,
    train_iters: int = 1,
    drop_begin: float = -1,
    drop_rate: float = 0.5,
) -> float:
    """Learning rate that iteration ``step`` (1-based) trains with.

    Args:
        step: iteration number k >= 1 (values < 1 are treated as 0: before training).
        base_lr: the peak learning rate.
        scheduler: one of :data:`SCHEDULERS` (case-insensitive).
        warmup_iters / drop_iters: W and D in steps (already resolved from fractions).
        train_iters: E, the number of iterations of the run.
        drop_begin / drop_rate: warmupstableexp parameters.
    Returns:
        The learning rate (a Python float).
    """
    name = normalise_name(scheduler)
    k = float(max(step, 0))
    W, D, E = float(warmup_iters), float(drop_iters), float(train_iters)
    if W > 0 and k < W:
        return base_lr * k / W
    if name == "constant":
        return base_lr
    if name == "cosine":
        p = min(1.0, (k - W) / max(1.0, E - W))
        return max(0.1 * base_lr, base_lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * p))))
    if name == "warmupstabledrop":
        if D > 0 and k > E - D:
            return base_lr * (0.1 + max(0.9 * (E - k) / D, 0.0))
        return base_lr
    if name == "warmupstableexp":
        if drop_begin >= 0 and D > 0 and k > drop_begin:
            return base_lr * drop_rate ** ((k - drop_begin) / D)
        return base_lr
    # linear
    if k > E:
        return 0.0
    start = max(W, 1.0)  # the first step at full lr
    return base_lr * (E - k + 1.0) / max(1.0, E - start + 1.0)


# ---------------------------------------------------------------------------------- words
def _schedule_values(cfg: Any) -> tuple[str, float, float, float, float]:
    """(name, lr, W, D, E) of a TrainConfig-like object (W and D resolved to steps)."""
    return normalise_name(cfg.lr_scheduler), float(cfg.lr), float(cfg.warmup_steps), float(cfg.drop_steps), \
        float(cfg.train_iters)


def _lr_of(cfg: Any, step: float) -> float:
    name, lr, W, D, E = _schedule_values(cfg)
    return lr_at(int(step), lr, scheduler=name, warmup_iters=W, drop_iters=D, train_iters=int(E),
                 drop_begin=cfg.drop_begin, drop_rate=cfg.drop_rate)


def schedule_text(cfg: Any) -> str:
    """The schedule in whole steps, naming only the phases it has, e.g. ``lr 0.01 cosine: warmup to
    step 20, then down to 10% at step 10000``."""
    name, lr, W, D, E = _schedule_values(cfg)
    parts = [f"warmup to step {math.ceil(W)}"] if W > 0 else []
    if name == "cosine":
        parts.append(f"cosine down to 10% at step {int(E)}")
    elif name == "linear":
        parts.append(f"linear down to 0 after step {int(E)}")
    elif name == "warmupstabledrop":
        parts.append(f"constant, then from step {math.floor(E - D)} down to 10% at step {int(E)}" if D > 0 else "constant")
    elif name == "warmupstableexp":
        parts.append(f"constant, then x{cfg.drop_rate:g} every {math.ceil(D)} steps from step {int(cfg.drop_begin)}"
                     if cfg.drop_begin >= 0 and D > 0 else "constant")
    else:
        parts.append("constant")
    return f"lr {lr:g} {name}: " + ", then ".join(parts) + f"; {int(E)} steps"


def schedule_warnings(cfg: Any) -> list[str]:
    """What the learning rate will do when the schedule is not what its numbers suggest: a warmup
    as long as the run, a decay that never starts."""
    name, lr, W, D, E = _schedule_values(cfg)
    out = []
    if W >= E and W > 0:
        out.append(f"warmup_iters is {math.ceil(W)} steps, not shorter than train_iters={int(E)}: the learning rate "
                   f"only rises, from {_lr_of(cfg, 1):.3g} at step 1 to {_lr_of(cfg, E):.3g} at the last step, and "
                   f"never reaches lr={lr:g}; lower warmup_iters (a fraction in (0, 1) is a share of train_iters)")
    if name == "warmupstabledrop" and D <= 0:
        out.append(f"warmupstabledrop with drop_iters 0: the learning rate stays at lr={lr:g} to the end (no drop)")
    if name == "warmupstableexp" and (cfg.drop_begin < 0 or D <= 0 or cfg.drop_begin >= E):
        out.append(f"warmupstableexp with drop_begin {cfg.drop_begin:g} and drop_iters {D:g}: the decay never starts "
                   f"within {int(E)} steps, the learning rate stays at lr={lr:g}; set drop_begin >= 0 and drop_iters > 0")
    return out
