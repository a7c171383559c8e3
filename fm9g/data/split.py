"""Held-out documents of a dataset (``eval_split``): which lines are kept out of training.

Line ``i`` of a dataset whose task is ``t`` gets the score ``splitmix64(i ^ crc32(t)·φ)`` (a fixed
64-bit hash: no seed, no rank, no state); the ``ceil(fraction · n)`` lines with the smallest
scores are held out (ties cannot occur: the hash is a bijection of 64-bit integers). So the same
documents are held out on every run, every rank and every resume, whatever the seed, the number
of processes or the other datasets of the mixture; changing the fraction only adds or removes
lines at the margin (a larger fraction holds out a superset). At least one line stays in
training and, for a fraction > 0, at least one is held out. docs/training.md ("Evaluation").
"""
from __future__ import annotations

import math

import numpy as np

from fm9g.data.order import _mix64, task_key

__all__ = ["SPLITS", "held_out_lines", "split_lines"]

SPLITS = ("train", "eval")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _scores(n: int, task_name: str) -> np.ndarray:
    """The (n,) uint64 hash of each line number, keyed by the task name."""
    with np.errstate(over="ignore"):
        key = np.uint64(task_key(task_name)) * _GOLDEN
        return _mix64(np.arange(n, dtype=np.uint64) ^ key)


def held_out_lines(n: int, fraction: float, task_name: str) -> np.ndarray:
    """The line ids (sorted int64) of a dataset of ``n`` lines that ``eval_split = fraction`` holds out.

    Args:
        n: the dataset's line count.
        fraction: share of lines held out, in [0, 1).
        task_name: the dataset's task name (keys the hash).
    Returns:
        (k,) int64 sorted line ids, ``k = min(max(ceil(fraction·n), 1), n - 1)`` (0 when fraction is 0).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval_split must be in [0, 1), got {fraction}")
    if fraction == 0.0 or n < 2:
        return np.zeros(0, dtype=np.int64)
    k = min(max(math.ceil(fraction * n), 1), n - 1)
    scores = _scores(n, task_name)
    chosen = np.argpartition(scores, k - 1)[:k] if k < n else np.arange(n)
    return np.sort(chosen.astype(np.int64))


def split_lines(n: int, fraction: float, task_name: str, split: str) -> np.ndarray | None:
    """The line ids of one side of the split: ``"eval"`` the held-out lines, ``"train"`` the rest.

    Returns:
        sorted int64 line ids, or None when nothing is held out (fraction 0: every line trains).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    held = held_out_lines(n, fraction, task_name)
    if held.size == 0:
        return held if split == "eval" else None
    if split == "eval":
        return held
    keep = np.ones(n, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep).astype(np.int64)
