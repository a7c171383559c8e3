"""Packer: rows of batch_size x max_length with per-document cu_seqlens / position_ids; no loss on padding."""
from __future__ import annotations

import random

import pytest
import torch

from fm9g.data.packing import Packer
from fm9g.data.tokenize import IGNORE_INDEX, TokenizedSample


def make_sample(doc_id: int, n: int, masked: int = 0) -> TokenizedSample:
    ids = [1000 * doc_id + j + 3 for j in range(n)]  # unique per document: lets the test find it
    masked = min(masked, n)
    labels = [IGNORE_INDEX] * masked + [t + 1 for t in ids[masked:]]
    return TokenizedSample(input_ids=ids, labels=labels)


def check_batch(batch: dict, B: int, L: int) -> list[list[tuple[int, int]]]:
    """Assert the invariants of one batch; return, per row, the (start, length) of each real document."""
    for key in ("input_ids", "labels", "position_ids", "task_ids"):
        assert batch[key].shape == (B, L) and batch[key].dtype == torch.long
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * L
    seg = torch.diff(cu).tolist()
    assert all(s > 0 for s in seg)
    assert batch["max_seqlen"] == max(seg)
    pos = batch["position_ids"].reshape(-1)
    # position ids restart at 0 exactly at each cu_seqlens boundary and count up inside a segment
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert pos[a:b].tolist() == list(range(b - a))
        assert a // L == (b - 1) // L, "a segment crosses a row boundary"
    docs: list[list[tuple[int, int]]] = []
    real = batch["task_ids"] != -1
    for r in range(B):
        row_docs, fill = [], int(real[r].sum())
        assert bool(real[r, :fill].all()) and not bool(real[r, fill:].any()), "padding only at the row's tail"
        assert (batch["labels"][r, fill:] == IGNORE_INDEX).all(), "padding carries no loss"
        assert (batch["input_ids"][r, fill:] == 0).all()
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if a // L == r and a % L < fill:
                row_docs.append((a % L, b - a))
        assert sum(n for _, n in row_docs) == fill
        docs.append(row_docs)
    assert batch["num_tokens"] == int(real.sum())
    assert batch["num_label_tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())
    return docs


def test_packing_invariants_random():
    rng = random.Random(0)
    B, L = 3, 64
    packer = Packer(B, L)
    samples = [(make_sample(i, rng.randint(1, L), masked=rng.randint(0, 3)), rng.randint(0, 4)) for i in range(200)]
    batches = []
    for s, t in samples:
        out = packer.add(s, t)
        if out is not None:
            batches.append(out)
    last = packer.flush()
    assert last is not None and packer.flush() is None
    batches.append(last)
    seen = []
    for batch in batches:
        for r, row_docs in enumerate(check_batch(batch, B, L)):
            for start, n in row_docs:
                ids = batch["input_ids"][r, start : start + n].tolist()
                doc_id = (ids[0] - 3) // 1000
                s, t = samples[doc_id]
                assert ids == s.input_ids, "a document is split or altered"
                assert batch["labels"][r, start : start + n].tolist() == s.labels
                assert set(batch["task_ids"][r, start : start + n].tolist()) == {t}
                seen.append(doc_id)
    assert seen == list(range(len(samples)))  # every sample once, in arrival order


def test_next_fit_rows_and_batch_boundary():
    packer = Packer(2, 10)
    assert packer.add(make_sample(0, 6), 0) is None
    assert packer.add(make_sample(1, 4), 0) is None  # fills row 0 exactly
    assert packer.add(make_sample(2, 5), 1) is None  # row 1
    assert packer.add(make_sample(3, 3), 1) is None  # still row 1 (8/10)
    batch = packer.add(make_sample(4, 3), 2)  # does not fit: batch emitted, sample starts the next one
    assert batch is not None
    docs = check_batch(batch, 2, 10)
    assert docs == [[(0, 6), (6, 4)], [(0, 5), (5, 3)]]
    assert batch["cu_seqlens"].tolist() == [0, 6, 10, 15, 18, 20]
    assert batch["num_tokens"] == 18
    nxt = packer.flush()
    check_batch(nxt, 2, 10)
    assert nxt["cu_seqlens"].tolist() == [0, 3, 10, 20]  # an empty row is one padding segment
    assert nxt["input_ids"][0, :3].tolist() == make_sample(4, 3).input_ids


def test_state_dict_round_trip_and_errors():
    a = Packer(2, 16)
    for i in range(5):
        a.add(make_sample(i, 5), i)
    state = a.state_dict()
    b = Packer(2, 16)
    b.load_state_dict(state)
    for i in range(5, 9):
        x, y = a.add(make_sample(i, 5), 0), b.add(make_sample(i, 5), 0)
        assert (x is None) == (y is None)
        if x is not None:
            assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "position_ids", "task_ids", "cu_seqlens"))
    fa, fb = a.flush(), b.flush()
    assert torch.equal(fa["input_ids"], fb["input_ids"])
    with pytest.raises(ValueError, match="batch_size=2"):
        Packer(3, 16).load_state_dict(state)
    with pytest.raises(ValueError, match="max_length"):
        a.add(make_sample(0, 17), 0)
