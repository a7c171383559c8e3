"""The mixer and packer of a :class:`fm9g.data.mixture.MixtureLoader`: from a state, pick a dataset
each step, take its next sample, pack, and yield each batch with the state after it.

The producer gets a :class:`MixPlan` (the fixed facts of the mixture) and a
:class:`fm9g.data.loader_state.Position`, never the loader itself. The sampling rules are in the
docstring of :mod:`fm9g.data.mixture` and in docs/mixture.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from fm9g.data.entries import DatasetEntry, check_shares
from fm9g.data.loader_state import Position, StateSettings
from fm9g.data.order import shard_len
from fm9g.data.packing import Packer
from fm9g.data.reader import LineSource
from fm9g.data.tokenize import TokenizedSample

__all__ = ["MixPlan", "Producer"]

_RNG_BLOCK = 256  # mixer random numbers are generated in blocks of this many steps


@dataclass(frozen=True, kw_only=True)
class MixPlan(StateSettings):
    """The fixed facts of one rank's mixture: the settings a state records, and the datasets,
    shard sizes and weights.

    Attributes:
        entries: the dataset config.
        shard_lens: lines of this rank's shard of each dataset.
        weights: normalised abs_weight (token shares) or weight x nlines (sample shares).
        token_shares: True when ``weights`` are token shares.
        prior_tokens: ``ave_tokens_per_line`` capped at ``max_length``, or None, per dataset.
        max_epochs: passes after which a repeating dataset drops out (None: never).
    """

    entries: list[DatasetEntry]
    max_epochs: int | None
    shard_lens: list[int]
    weights: list[float]
    token_shares: bool
    prior_tokens: list[float | None]

    @classmethod
    def build(cls, entries: list[DatasetEntry], nlines: list[int], **settings: Any) -> "MixPlan":
        """Derive shard sizes, weights and priors from the entries, line counts and ``settings``
        (``seed``, ``rank``, ``world_size``, ``max_length``, ``batch_size``, ``sampler``, ``max_epochs``)."""
        max_length = settings["max_length"]
        token_shares = entries[0].abs_weight is not None
        if token_shares:
            total = sum(float(e.abs_weight) for e in entries)  # type: ignore[arg-type]
            weights = [float(e.abs_weight) / total for e in entries]  # type: ignore[arg-type]
        else:
            raw = [float(e.weight) * n for e, n in zip(entries, nlines)]
            check_shares(raw, "weight x nlines", "the dataset config")
            weights = [w / sum(raw) for w in raw]
        prior = [None if e.ave_tokens_per_line is None else float(min(e.ave_tokens_per_line, max_length)) for e in entries]
        shard_lens = [shard_len(n, settings["rank"], settings["world_size"], e.allow_repeat)
                      for e, n in zip(entries, nlines)]
        return cls(
            entries=entries, task_names=[e.task_name for e in entries], nlines=nlines, shard_lens=shard_lens,
            weights=weights, token_shares=token_shares, prior_tokens=prior, **settings,
        )

    def avg_tokens(self, d: int, tokens: int, samples: int) -> float:
        """Running mean sample length of dataset ``d`` after drawing ``samples`` samples of
        ``tokens`` tokens in all (the prior counts as one sample)."""
        prior = self.prior_tokens[d]
        if prior is None:
            return tokens / samples if samples else float(self.max_length)
        return (tokens + prior) / (samples + 1)

    def task_stats(self, parts: list[dict[str, Any]], d: int) -> dict[str, Any]:
        """:meth:`fm9g.data.mixture.MixtureLoader.stats` of dataset ``d`` over the states ``parts``
        (lanes, or one rank's): the counters summed, the largest epoch, exhausted in every part."""
        def total(key: str) -> int:
            return sum(int(p[key][d]) for p in parts)

        reasons: dict[str, int] = {}
        for p in parts:
            for why, n in (p.get("drop_reasons") or [{}] * len(self.task_names))[d].items():
                reasons[why] = reasons.get(why, 0) + int(n)
        return {
            "samples": total("out_samples"), "tokens": total("out_tokens"), "label_tokens": total("out_label_tokens"),
            "dropped_lines": total("dropped_lines"), "drop_reasons": reasons,
            "epoch": max((int(p["epoch"][d]) for p in parts), default=0),
            "exhausted": bool(parts) and all(bool(p["exhausted"][d]) for p in parts),
            "avg_tokens": self.avg_tokens(d, total("mix_tokens"), total("mix_samples")),
            "weight": self.weights[d],
        }


class Producer:
    """Runs the mixing from a position; :meth:`run` yields ``(batch, state_after_batch)``."""

    def __init__(self, plan: MixPlan, state: dict[str, Any], source: LineSource) -> None:
        self.plan = plan
        self.source = source
        self.D = len(plan.entries)
        self.pos = pos = Position.from_state(state)
        self.packer = Packer(plan.batch_size, plan.max_length)
        if pos.packer is not None:
            self.packer.load_state_dict(pos.packer)
        self.line_of: list[int] = [-1] * self.D  # line id of the window being handed out per dataset
        # windows of the line being handed out (re-tokenized on resume: deterministic)
        self.windows: list[list[TokenizedSample] | None] = [None] * self.D
        for d in range(self.D):
            if pos.cur_window[d] >= 0:
                self.line_of[d], self.windows[d] = source.get(d, pos.epoch[d], pos.next_line[d] - 1)
        self._u_block = -1
        self._u: np.ndarray | None = None

    # -- randomness: a pure function of (seed, rank, step) --------------------------------------
    def _uniforms(self, step: int) -> np.ndarray:
        block = step // _RNG_BLOCK
        if block != self._u_block:
            rng = np.random.default_rng([self.plan.seed, self.plan.rank, block, 0x6D6978])
            self._u = rng.random((_RNG_BLOCK, self.D))
            self._u_block = block
        assert self._u is not None
        return self._u[step % _RNG_BLOCK]

    def _avg_tokens(self, d: int) -> float:
        return self.plan.avg_tokens(d, self.pos.mix_tokens[d], self.pos.mix_samples[d])

    def _pick(self) -> int | None:
        pos, plan = self.pos, self.plan
        active = [d for d in range(self.D) if not pos.exhausted[d]]
        if not active:
            return None
        u = self._uniforms(pos.step)
        pos.step += 1
        w = plan.weights
        token_mode = plan.token_shares
        if plan.sampler == "deficit":
            best, best_score = -1, math.inf
            for d in active:
                unit = self._avg_tokens(d) if token_mode else 1.0
                progress = pos.mix_tokens[d] if token_mode else pos.mix_samples[d]
                score = (progress + float(u[d]) * unit) / w[d]
                if score < best_score:
                    best, best_score = d, score
            return best
        p = np.array([w[d] / (self._avg_tokens(d) if token_mode else 1.0) for d in active])
        c = np.cumsum(p / p.sum())
        return active[min(int(np.searchsorted(c, float(u[0]), side="right")), len(active) - 1)]

    def _next_sample(self, d: int) -> TokenizedSample | None:
        """The next window of dataset ``d``, or ``None`` when it drops out."""
        pos, plan = self.pos, self.plan
        while True:
            win = self.windows[d]
            if win is not None:
                s = win[pos.cur_window[d]]
                pos.cur_window[d] += 1
                if pos.cur_window[d] == len(win):
                    self.windows[d], pos.cur_window[d] = None, -1
                pos.epoch_samples[d] += 1
                return s
            if pos.next_line[d] < plan.shard_lens[d]:
                line, win = self.source.get(d, pos.epoch[d], pos.next_line[d])
                if win:
                    self.windows[d], pos.cur_window[d], self.line_of[d] = win, 0, line
                else:
                    pos.dropped_lines[d] += 1
                    why = getattr(win, "reason", "other")
                    pos.drop_reasons[d][why] = pos.drop_reasons[d].get(why, 0) + 1
                pos.next_line[d] += 1
                continue
            if not self._next_epoch(d):
                pos.exhausted[d] = True  # a flag, set once: never counted twice
                return None

    def _next_epoch(self, d: int) -> bool:
        """This rank's shard of dataset ``d`` is used up: start its next epoch, or return False
        when it drops out instead."""
        pos, plan = self.pos, self.plan
        entry = plan.entries[d]
        if not (entry.allow_repeat and (plan.max_epochs is None or pos.epoch[d] + 1 < plan.max_epochs)):
            return False
        if pos.epoch_samples[d] == 0:  # repeating it would loop forever
            raise RuntimeError(
                f"task {entry.task_name!r} ({entry.path}): a whole epoch of this rank's shard "
                f"({plan.shard_lens[d]} lines) produced no sample (all dropped by the transform or "
                f"the tokenizer: empty output, prompt longer than max_length={plan.max_length}, or "
                f"oversize_rule='drop'); fix the data or remove the entry"
            )
        pos.epoch[d] += 1
        pos.next_line[d] = 0
        pos.epoch_samples[d] = 0
        return True

    def _finish(self, batch: dict[str, Any], lines: list[tuple[int, int]]) -> dict[str, Any]:
        pos = self.pos
        task_ids = batch["task_ids"].reshape(-1)
        real = task_ids >= 0
        tok = torch.bincount(task_ids[real], minlength=self.D).tolist()
        starts = real & (batch["position_ids"].reshape(-1) == 0)
        smp = torch.bincount(task_ids[starts], minlength=self.D).tolist()
        labelled = real & (batch["labels"].reshape(-1) != -100)
        lab = torch.bincount(task_ids[labelled], minlength=self.D).tolist()
        for d in range(self.D):
            pos.out_tokens[d] += tok[d]
            pos.out_samples[d] += smp[d]
            pos.out_label_tokens[d] += lab[d]
        pos.batches += 1
        batch["task_names"] = list(self.plan.task_names)
        batch["sample_lines"] = torch.tensor(lines, dtype=torch.int64).reshape(-1, 2)
        return batch

    def cancel(self) -> None:
        """Stop the source's read-ahead (as :meth:`fm9g.data.stream.RankStream.cancel`)."""
        self.source.cancel()

    def snapshot(self) -> dict[str, Any]:
        """The state after the last batch produced (small: tensors of length D, the packer's rows)."""
        self.pos.packer = self.packer.state_dict()
        return self.pos.to_state(self.plan)

    def run(self) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any]]]:
        """Yield ``(batch, state after it)`` until every dataset dropped out; the last item is
        ``(last partial batch or None, final state)``."""
        pos = self.pos
        if pos.finished:
            return
        while True:
            d = self._pick()
            if d is None:
                break
            sample = self._next_sample(d)
            if sample is None:
                continue
            pos.mix_tokens[d] += len(sample.input_ids)
            pos.mix_samples[d] += 1
            batch = self.packer.add(sample, d)
            pos.waiting.append((d, self.line_of[d]))
            if batch is not None:
                # the batch holds everything added before this sample, which starts the next one
                batch = self._finish(batch, pos.waiting[:-1])
                pos.waiting = pos.waiting[-1:]
                yield batch, self.snapshot()
        batch = self.packer.flush()
        pos.finished = True
        if batch is not None:
            batch = self._finish(batch, pos.waiting)
            pos.waiting = []
        yield batch, self.snapshot()
