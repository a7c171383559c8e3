"""`fm9g inspect <run folder>`: where a run stands — step against train_iters, the last loss,
finished or not, ``latest`` (and ``best`` once evaluation chose one), whether a process holds it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _train_iters(latest: Path | None) -> int | None:
    """train_iters of the run, from the train_config.json its latest checkpoint keeps."""
    if latest is None or not (latest / "train_config.json").is_file():
        return None
    try:
        return int(json.loads((latest / "train_config.json").read_text(encoding="utf-8")).get("train_iters"))
    except (ValueError, TypeError):
        return None


def _last_row(run: Path) -> dict[str, Any] | None:
    from fm9g.training.metrics import read_train_stats

    try:
        rows = read_train_stats(run)
    except (FileNotFoundError, ValueError):
        return None
    return rows[-1] if rows else None


def summarize_run(run: Path) -> str | None:
    """The text for a run folder (None when `run` holds neither checkpoints nor train stats)."""
    from fm9g.training.checkpoint import best_checkpoint, latest_checkpoint, list_checkpoints
    from fm9g.training.run_lock import describe_holder, read_lock, stale_reason

    cks = list_checkpoints(run)
    row = _last_row(run)
    if not cks and row is None:
        return None
    latest = latest_checkpoint(run) if cks else None
    total = _train_iters(latest)
    step = int(row["iteration"]) if row is not None else (int(latest.name) if latest is not None else 0)
    holder = read_lock(run)
    running = holder is not None and stale_reason(holder) is None
    state = ("training now (" + describe_holder(holder) + ")" if running
             else "finished" if total is not None and latest is not None and int(latest.name) >= total
             else "not finished" if total is not None else "unknown (no checkpoint yet)")
    lines = [f"run folder {run}: step {step}" + (f" of train_iters={total}" if total else "") + f"; {state}"]
    if row is not None:
        lines.append(f"last loss {row.get('loss', float('nan')):.4f} at step {row['iteration']}")
    lines.append(f"latest: {latest}" if latest is not None else "latest: none (no checkpoint yet)")
    best = best_checkpoint(run) if cks else None
    if best is not None:
        lines.append(f"best: {best}")
    lines.append(f"{len(cks)} checkpoints")
    lines += [f"  step {s:>8d}  {c}" for s, c in cks]
    return "\n".join(lines)
