"""Pack tokenized samples into fixed ``[batch_size, max_length]`` rows for varlen attention.

Next-fit, in arrival order: a sample goes into the current row when it fits, otherwise into the
next row; when no row is left the finished batch is returned and the sample starts a new one. A
document never spans rows (long texts were already cut into windows by
:class:`fm9g.data.tokenize.SampleTokenizer`, each its own sample).

Batch dict (``B = batch_size``, ``L = max_length``)::

    input_ids     Long[B, L]   pad 0
    labels        Long[B, L]   pad -100 (padding never carries loss)
    position_ids  Long[B, L]   0.. restarting at every document; a row's padding tail counts 0..
    task_ids      Long[B, L]   task of each token, pad -1
    cu_seqlens    Int32[n+1]   document boundaries over the flattened B*L tokens: starts at 0, ends
                               at B*L; each row's padding tail (or an empty row) is its own segment
    max_seqlen    int          longest segment (padding segments included)
    num_tokens    int          real (non-padding) tokens
    num_label_tokens int       positions with labels != -100
"""
from __future__ import annotations

from typing import Any

import torch

from fm9g.data.tokenize import IGNORE_INDEX, TokenizedSample

__all__ = ["Packer", "stack_rows"]


class Packer:
    """Accumulate :class:`TokenizedSample` s into packed batches.

    Args:
        batch_size: rows per batch (``B``).
        max_length: tokens per row (``L``); every sample must have ``len <= L``.
    """

    def __init__(self, batch_size: int, max_length: int) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        # rows[r] = list of (input_ids, labels, task_id) documents
        self._rows: list[list[tuple[list[int], list[int], int]]] = [[]]
        self._row_fill = 0

    def __len__(self) -> int:
        """Number of samples waiting in the current (unfinished) batch."""
        return sum(len(r) for r in self._rows)

    def add(self, sample: TokenizedSample, task_id: int) -> dict[str, Any] | None:
        """Add one sample; returns the finished batch when the sample did not fit (it then starts
        the next batch), else ``None``.

        Raises:
            ValueError: the sample is longer than ``max_length`` or empty, or its labels differ in length.
        """
        n = len(sample.input_ids)
        if n == 0 or n > self.max_length or len(sample.labels) != n:
            raise ValueError(
                f"cannot pack a sample of {n} tokens ({len(sample.labels)} labels) into rows of "
                f"{self.max_length}: tokenize with max_length <= the packer's max_length"
            )
        doc = (list(sample.input_ids), list(sample.labels), int(task_id))
        if self._row_fill + n <= self.max_length:
            self._rows[-1].append(doc)
            self._row_fill += n
            return None
        if len(self._rows) < self.batch_size:
            self._rows.append([doc])
            self._row_fill = n
            return None
        batch = self._emit()
        self._rows = [[doc]]
        self._row_fill = n
        return batch

    def flush(self) -> dict[str, Any] | None:
        """Return the partly filled batch (empty rows are all padding), or ``None`` if nothing waits."""
        if not any(self._rows):
            return None
        batch = self._emit()
        self._rows = [[]]
        self._row_fill = 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The waiting samples (plain lists, safe for ``torch.save`` / ``weights_only`` loading)."""
        return {
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "rows": [[[ids, labels, task] for ids, labels, task in row] for row in self._rows],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the waiting samples saved by :meth:`state_dict` (same batch_size / max_length)."""
        if state["batch_size"] != self.batch_size or state["max_length"] != self.max_length:
            raise ValueError(
                f"packer state is for batch_size={state['batch_size']}, max_length={state['max_length']}; "
                f"this packer has {self.batch_size}, {self.max_length}"
            )
        rows = [[(list(ids), list(labels), int(task)) for ids, labels, task in row] for row in state["rows"]]
        self._rows = rows or [[]]
        self._row_fill = sum(len(d[0]) for d in self._rows[-1])

    def _emit(self) -> dict[str, Any]:
        B, L = self.batch_size, self.max_length
        input_ids = torch.zeros(B, L, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(B, L, dtype=torch.long)
        task_ids = torch.full((B, L), -1, dtype=torch.long)
        arange = torch.arange(L, dtype=torch.long)
        seqlens: list[int] = []
        num_tokens = 0
        for r in range(B):
            row = self._rows[r] if r < len(self._rows) else []
            pos = 0
            for ids, lab, task in row:
                n = len(ids)
                input_ids[r, pos : pos + n] = torch.tensor(ids, dtype=torch.long)
                labels[r, pos : pos + n] = torch.tensor(lab, dtype=torch.long)
                position_ids[r, pos : pos + n] = arange[:n]
                task_ids[r, pos : pos + n] = task
                seqlens.append(n)
                pos += n
            num_tokens += pos
            if pos < L:  # the padding tail is its own segment
                position_ids[r, pos:] = arange[: L - pos]
                seqlens.append(L - pos)
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "task_ids": task_ids,
            "cu_seqlens": cu,
            "max_seqlen": max(seqlens),
            "num_tokens": num_tokens,
            "num_label_tokens": int((labels != IGNORE_INDEX).sum()),
        }


def _empty_row(max_length: int) -> dict[str, Any]:
    """A one-row batch of padding only (a lane of the global stream that has ended)."""
    return Packer(1, max_length)._emit() | {"sample_lines": torch.zeros(0, 2, dtype=torch.long)}


def stack_rows(rows: list[dict[str, Any] | None], max_length: int) -> dict[str, Any]:
    """One ``[len(rows), L]`` batch of one-row batches (``None``: a row of padding), in order.

    Tensors of shape [1, L] are concatenated; ``cu_seqlens`` continue over the flattened rows;
    ``max_seqlen`` is the largest, ``num_tokens`` / ``num_label_tokens`` the sums; ``sample_lines``
    (when the rows have it) are concatenated; other values are the first row's.
    """
    full = [r if r is not None else _empty_row(max_length) for r in rows]
    out = dict(full[0])
    for key in ("input_ids", "labels", "position_ids", "task_ids"):
        out[key] = torch.cat([r[key] for r in full])
    cus = [full[0]["cu_seqlens"]] + [r["cu_seqlens"][1:] + i * max_length for i, r in enumerate(full) if i]
    out["cu_seqlens"] = torch.cat(cus).to(torch.int32)
    out["max_seqlen"] = max(int(r["max_seqlen"]) for r in full)
    out["num_tokens"] = sum(int(r["num_tokens"]) for r in full)
    out["num_label_tokens"] = sum(int(r["num_label_tokens"]) for r in full)
    if all("sample_lines" in r for r in full):
        out["sample_lines"] = torch.cat([r["sample_lines"] for r in full])
    return out
