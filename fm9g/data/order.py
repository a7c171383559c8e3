"""The line order of a mixture: which line of a dataset a rank reads at each step of each epoch.

In epoch ``e`` dataset *i* is read in the order of a pseudo-random permutation of its lines keyed
by ``(seed, task_name, e)``: a Feistel network, so nothing of the dataset's size is stored and any
position is computed on demand. Rank ``r`` of ``W`` reads positions ``r, r+W, r+2W, ...`` (its
*shard*): the ranks' line sets are disjoint and together cover the dataset once per epoch. A
dataset with fewer lines than ranks (allowed only when it repeats) gives rank ``r`` the line at
position ``r mod nlines``. See docs/mixture.md.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

__all__ = ["Permutation", "ShardOrder", "shard_len", "task_key"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A keyed pseudo-random bijection of ``[0, n)`` (balanced Feistel network + cycle walking).

    Computing ``perm(positions)`` costs O(len(positions)); nothing of size ``n`` is stored.
    """

    def __init__(self, n: int, key: Sequence[int]) -> None:
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(6, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Map positions (int array, each in ``[0, n)``) to line ids (int64 array, same shape)."""
        x = np.asarray(positions, dtype=np.uint64)
        if self.n <= 1:
            return np.zeros_like(x, dtype=np.int64)
        with np.errstate(over="ignore"):
            x = self._encrypt(x)
            out = x >= np.uint64(self.n)
            while out.any():  # cycle walking: stays a bijection of [0, n)
                x[out] = self._encrypt(x[out])
                out = x >= np.uint64(self.n)
        return x.astype(np.int64)


def shard_len(n: int, rank: int, world: int, repeat: bool = True) -> int:
    """Lines part ``rank`` of ``world`` reads per epoch of an ``n``-line dataset (a part is a rank,
    or a lane of the global stream: :mod:`fm9g.data.stream`). With fewer lines than parts, a
    repeating dataset gives every part one line (position ``rank mod n``); a non-repeating one
    gives the parts ``rank < n`` one line and the others none."""
    if n < world and repeat:
        return 1
    return (n - rank + world - 1) // world


def _shard_positions(n: int, rank: int, world: int, k: np.ndarray) -> np.ndarray:
    """Epoch positions of this rank's shard indices ``k``."""
    if n < world:
        return np.full_like(k, rank % n)
    return rank + k * world


def task_key(task_name: str) -> int:
    """The number a task name contributes to every random key of its dataset."""
    return zlib.crc32(task_name.encode("utf-8"))


class ShardOrder:
    """The line ids one rank reads from each dataset, per epoch and shard index.

    Args:
        nlines: line count of each dataset.
        task_names: each dataset's task name (part of its permutation key).
        seed: the loader's seed (the same line order on every rank).
        rank / world_size: this rank and the number of ranks.
    """

    def __init__(self, nlines: Sequence[int], task_names: Sequence[str], seed: int, rank: int, world_size: int) -> None:
        self.nlines = [int(n) for n in nlines]
        self.keys = [task_key(t) for t in task_names]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._cache: dict[tuple[int, int], Permutation] = {}

    def permutation(self, d: int, epoch: int) -> Permutation:
        """The line order of dataset ``d`` in ``epoch`` (a few recent ones are kept)."""
        key = (d, epoch)
        perm = self._cache.get(key)
        if perm is None:
            if len(self._cache) > 4 * len(self.nlines):
                self._cache.clear()
            perm = Permutation(self.nlines[d], (self.seed, self.keys[d], epoch, 0x5EED))
            self._cache[key] = perm
        return perm

    def line_ids(self, d: int, epoch: int, k: np.ndarray, part: tuple[int, int] | None = None) -> np.ndarray:
        """Line ids read at shard indices ``k`` (int64 array) of dataset ``d`` in ``epoch`` by this
        rank, or by ``part = (index, count)`` (a lane of the global stream) when given."""
        rank, world = part if part is not None else (self.rank, self.world_size)
        positions = _shard_positions(self.nlines[d], rank, world, k)
        return self.permutation(d, epoch)(positions)
