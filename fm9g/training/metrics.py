"""Throughput, MFU and the run's logs: console line, progress bar, TensorBoard, train_stats jsonl.

MFU: ``tokens/s × FLOPs per token / peak``, with FLOPs per token (torchtitan's
formula) ``6·N + 12·L·H·d_head·S``: N = parameters except the input embedding, S = packed row
length (``max_length``), peak = the GPU's dense bf16 FLOP/s (989e12 on H100/H200).

TensorBoard scalars keep the original names: ``Loss/train``, ``Optimizer/lr``,
``Optimizer/grad_norm``, ``Loss/train/<task>``; plus ``Throughput/tokens_per_s`` and
``Throughput/mfu``. ``train_stats/<n>.jsonl`` holds one flat JSON object per iteration (a new file
after 19 MB, like the original).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["flops_per_token", "mfu", "MetricsLogger", "format_tokens", "read_train_stats", "inspect_model",
           "dropped_records", "dropped_since"]

STATS_ROLL_BYTES = 19 * 2**20  # MetricsLogger's default roll_bytes (19 MiB, like the original)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: ``6·N + 12·L·H·d_head·S`` (N excludes the input embedding).

    Args:
        model: an FM9GModel (reads ``model.config``: num_layers, num_heads, dim_head).
        seq_len: S, the packed row length.
    """
    n = sum(p.numel() for p in model.parameters())
    emb = getattr(model, "input_embedding", None)
    if isinstance(emb, nn.Embedding):
        n -= emb.weight.numel()
    cfg = getattr(model, "config", None)
    attn = 0
    if cfg is not None:
        L = int(getattr(cfg, "num_layers", 0))
        H = int(getattr(cfg, "num_heads", 0))
        dh = int(getattr(cfg, "dim_head", 0))
        attn = 12 * L * H * dh * seq_len
    return float(6 * n + attn)


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak, or when the figure would
    exceed the peak (then the time or ``peak_flops`` is wrong, and no false MFU is shown)."""
    if not peak_flops:
        return None
    value = tokens_per_s * flops_per_tok / peak_flops
    return value if value <= 1.0 else None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_tokens(n: float) -> str:
    """``1234567`` -> ``"1.23M"`` (K / M / B)."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


class MetricsLogger:
    """Writes every iteration to the console, the progress bar, TensorBoard and train_stats.

    Args:
        total_steps: train_iters (for the progress bar and its ETA).
        start_step: the step training resumes after (0 for a fresh run).
        tensorboard_dir: directory for tensorboardX event files (None: no TensorBoard).
        stats_dir: directory for ``<n>.jsonl`` train stats (None: not written).
        log_iters: print a console line every N iterations.
        progress_bar: show a tqdm bar.
        enabled: False on non-main ranks (nothing is written).
        stream: where console lines go (default stdout).
        tensorboard_task_loss: write the per-task scalars ``Loss/train/<task>`` to TensorBoard (the
            original's ``tensorboard_all_tasks``); per-task losses are on the console line and in
            train_stats either way.
        roll_bytes: start the next ``<n+1>.jsonl`` once the current train_stats file passes this
            many bytes (default :data:`STATS_ROLL_BYTES`, 19 MiB like the original); a file ends at
            most one row past it.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard_dir: str | os.PathLike | None = None,
        stats_dir: str | os.PathLike | None = None,
        log_iters: int = 1,
        progress_bar: bool = True,
        enabled: bool = True,
        stream: Any = None,
        tensorboard_task_loss: bool = True,
        roll_bytes: int = STATS_ROLL_BYTES,
    ) -> None:
        if roll_bytes < 1:
            raise ValueError(f"roll_bytes must be a positive number of bytes, got {roll_bytes}")
        self.enabled = enabled
        self.roll_bytes = roll_bytes
        self.tensorboard_task_loss = tensorboard_task_loss
        self.log_iters = max(1, log_iters)
        self.stream = stream or sys.stdout
        self.writer = None
        self.bar = None
        self.stats_dir = Path(stats_dir) if stats_dir is not None else None
        self._stats_file: Path | None = None
        self._stats_handle: Any = None
        if not enabled:
            return
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(logdir=str(tensorboard_dir))
        if self.stats_dir is not None:
            self.stats_dir.mkdir(parents=True, exist_ok=True)
            existing = sorted(self.stats_dir.glob("*.jsonl"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
            self._stats_file = existing[-1] if existing else self.stats_dir / "0.jsonl"
        if progress_bar and _is_terminal(sys.stderr):  # a redirected log gets no \r updates
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="it", dynamic_ncols=True,
                            file=sys.stderr, leave=True)

    def print(self, msg: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def log(self, step: int, stats: dict[str, Any], task_loss: dict[str, float] | None = None) -> None:
        """Record iteration ``step``.

        Args:
            stats: ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ``mem_gb``,
                ``iter_time``, ``token_pass``, ... (any JSON-able scalars).
            task_loss: per-task mean loss of this step, by task name.
        """
        if not self.enabled:
            return
        task_loss = {k: v for k, v in (task_loss or {}).items() if v is not None and math.isfinite(v)}
        if self.writer is not None:
            for tag, key in (("Loss/train", "loss"), ("Optimizer/lr", "lr"), ("Optimizer/grad_norm", "grad_norm"),
                             ("Throughput/tokens_per_s", "tokens_per_s"), ("Throughput/mfu", "mfu")):
                v = stats.get(key)
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(tag, v, step)
            for name, v in task_loss.items() if self.tensorboard_task_loss else ():
                self.writer.add_scalar(f"Loss/train/{name}", v, step)
        if self._stats_file is not None:
            row = {"time": time.time(), "iteration": step, **stats}
            row.update({f"task_loss/{k}": v for k, v in task_loss.items()})
            f = self._stats_out()
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()  # a line is in the file once logged (the run may be killed at any step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.4f}", lr=f"{stats.get('lr', 0):.2e}")
        if step % self.log_iters == 0:
            self.print(self.format_line(step, stats, task_loss))

    def write_row(self, row: dict[str, Any]) -> None:
        """Append one JSON row to train_stats (an evaluation's, see
        :class:`fm9g.training.callbacks.JsonlLogger`); nothing when train_stats is off."""
        if not self.enabled or self._stats_file is None:
            return
        f = self._stats_out()
        f.write(json.dumps(row, default=float) + "\n")
        f.flush()

    def _stats_out(self) -> Any:
        """The train_stats file, open for appending (kept open: one open and two stats a step cost
        host time a device-bound run does not have), rolled to ``<n+1>.jsonl`` past ``roll_bytes``."""
        f = self._stats_handle
        if f is not None and f.tell() <= self.roll_bytes:
            return f
        if f is not None:
            f.close()
            n = int(self._stats_file.stem) + 1 if self._stats_file.stem.isdigit() else 0
            self._stats_file = self._stats_file.with_name(f"{n}.jsonl")
        self._stats_handle = f = open(self._stats_file, "a", encoding="utf-8")
        if f.tell() > self.roll_bytes:  # a full file left by an earlier run
            return self._stats_out()
        return f

    @staticmethod
    def format_line(step: int, s: dict[str, Any], task_loss: dict[str, float]) -> str:
        """``| Iter: 12 | loss: 2.3456 | lr: 1.0000e-04 | grad_norm: 0.81 | tokens/s: ... |``"""
        parts = [f"Iter: {step:6d}", f"loss: {s.get('loss', float('nan')):.4f}", f"lr: {s.get('lr', 0.0):.4e}"]
        if s.get("grad_norm") is not None:
            parts.append(f"grad_norm: {s['grad_norm']:.4f}")
        if s.get("tokens_per_s") is not None:
            parts.append(f"tokens/s: {s['tokens_per_s']:,.0f}")
        if s.get("mfu") is not None:
            parts.append(f"MFU: {100 * s['mfu']:.1f}%")
        if s.get("iter_time") is not None:
            parts.append(f"iter_time: {s['iter_time']:.3f}s")
        if s.get("save_time") is not None:
            parts.append(f"save_time: {s['save_time']:.3f}s")
        if s.get("dropped"):
            parts.append("dropped: " + ", ".join(
                f"{task} {sum(why.values())} ({', '.join(f'{r} {n}' for r, n in sorted(why.items()))})"
                for task, why in s["dropped"].items()))
        if s.get("token_pass") is not None:
            parts.append(f"token_pass: {format_tokens(s['token_pass'])}")
        if s.get("mem_gb") is not None:
            parts.append(f"mem: {s['mem_gb']:.1f}G (peak {s.get('peak_mem_gb', 0):.1f}G)")
        if s.get("skipped"):
            parts.append(f"skipped: {s['skipped']}")
        line = "| " + " | ".join(parts) + " |"
        if task_loss:
            line += "\n\ttask_loss: | " + " | ".join(f"{k}: {v:.4f}" for k, v in task_loss.items()) + " |"
        return line

    def close(self) -> None:
        if self._stats_handle is not None:
            self._stats_handle.close()
            self._stats_handle = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_train_stats(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a train_stats jsonl file, or of every ``*.jsonl`` of a folder (a run folder is
    looked into for ``train_stats/``). A later row for the same iteration (after a resume)
    replaces the earlier one; an evaluation's row (``"kind": "eval"``) is merged into its
    iteration's row (keys ``eval_*``). Sorted by iteration."""
    p = Path(path)
    if p.is_dir() and (p / "train_stats").is_dir():
        p = p / "train_stats"
    files = [p] if p.is_file() else sorted(p.glob("*.jsonl"), key=lambda q: int(q.stem) if q.stem.isdigit() else -1)
    if not files:
        raise FileNotFoundError(f"no train_stats jsonl under {path}")
    rows: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{f}:{lineno}: not a JSON line") from None
                if row.get("kind") == "eval":
                    evals[int(row["iteration"])] = {k: v for k, v in row.items() if k.startswith("eval_")}
                else:
                    rows[int(row.get("iteration", len(rows)))] = row
    for it, ev in evals.items():
        rows.setdefault(it, {"iteration": it}).update(ev)
    return [rows[k] for k in sorted(rows)]


def inspect_model(model: nn.Module, max_rows: int = 12) -> str:
    """A short table of parameter statistics (the original's ``inspect_model``): the largest
    parameters by norm with mean / std / max|x| and, if present, the gradient norm."""
    rows = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().float()
            g = p.grad.detach().float().norm().item() if p.grad is not None else None
            rows.append((x.norm().item(), name, x.mean().item(), x.std().item() if x.numel() > 1 else 0.0,
                         x.abs().max().item(), g))
    rows.sort(reverse=True)
    lines = [f"{'name':60s} {'norm':>10s} {'mean':>10s} {'std':>10s} {'max|x|':>10s}"]
    for norm, name, mean, std, amax, _ in rows[:max_rows]:
        lines.append(f"{name[:60]:60s} {norm:10.4f} {mean:10.4f} {std:10.4f} {amax:10.4f}")
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more parameters")
    return "\n".join(lines)


def dropped_records(loader: Any) -> dict[str, dict[str, int]]:
    """Records the loader read and dropped so far, ``{task: {reason: count}}`` (``{}`` for a loader
    without ``stats()``); reasons as :class:`fm9g.data.tokenize.Dropped` gives them (the transform
    returned None, empty output, prompt longer than max_length, ``oversize_rule`` drop, no trained turn)."""
    stats = getattr(loader, "stats", None)
    if not callable(stats):
        return {}
    try:
        per_task = stats()
    except Exception:  # noqa: BLE001 - a user's loader whose stats() fails only loses this figure
        return {}
    out: dict[str, dict[str, int]] = {}
    for task, v in per_task.items():
        if isinstance(v, dict) and int(v.get("dropped_lines", 0)):
            why = {str(r): int(n) for r, n in (v.get("drop_reasons") or {}).items() if n}
            rest = int(v["dropped_lines"]) - sum(why.values())  # a loader that counts no reasons
            out[str(task)] = {**why, **({"unknown": rest} if rest > 0 else {})}
    return out


def dropped_since(loader: Any, seen: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The records dropped per task and reason since `seen` (updated in place to the new totals);
    only tasks and reasons that dropped some."""
    now = dropped_records(loader)
    delta: dict[str, dict[str, int]] = {}
    for task, why in now.items():
        before = seen.get(task, {})
        d = {r: n - before.get(r, 0) for r, n in why.items() if n > before.get(r, 0)}
        if d:
            delta[task] = d
    seen.clear()
    seen.update(now)
    return delta
