"""`fm9g plot RUN_DIR|STATS.jsonl -o curves.png`: loss and learning-rate curves of a run."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fm9g._io import atomic_file


def plot_run(path: str | os.PathLike, out: str | os.PathLike, *, tasks: bool = True) -> Path:
    """Draw loss (and per-task losses, and the eval loss of each evaluation) and lr against the iteration into a PNG.

    Args:
        path: a run folder (``<save>/<model_unique>``, its ``train_stats/`` is read), a
            train_stats folder, or one ``.jsonl`` file.
        out: the PNG to write.
        tasks: also draw ``task_loss/<task>`` curves.
    Returns:
        The written path.
    Raises:
        ImportError: matplotlib is missing (``pip install 'fm9g[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("fm9g plot needs matplotlib: pip install 'fm9g[plot]'") from err
    from fm9g.training.metrics import read_train_stats

    rows: list[dict[str, Any]] = read_train_stats(path)
    it = [r["iteration"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax1.plot(it, [r.get("loss") for r in rows], label="loss", lw=1.5)
    if tasks:
        names = sorted({k for r in rows for k in r if k.startswith("task_loss/")})
        for name in names:
            pts = [(r["iteration"], r[name]) for r in rows if name in r]
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=name[len("task_loss/"):], lw=0.8, alpha=0.7)
    ev = [(r["iteration"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if ev:  # held-out loss of each evaluation (eval_iters)
        ax1.plot([p[0] for p in ev], [p[1] for p in ev], "o-", color="black", label="eval loss", lw=1.2, ms=3)
    ax1.set_ylabel("loss")
    ax1.legend(loc="upper right")
    ax1.grid(alpha=0.3)
    ax2.plot(it, [r.get("lr") for r in rows], color="tab:orange")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("iteration")
    ax2.grid(alpha=0.3)
    fig.suptitle(str(path))
    fig.tight_layout()
    out = Path(out)
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="draw loss and lr curves of a run to a PNG",
                              description="Plot train_stats of a run (needs matplotlib: pip install 'fm9g[plot]').")
    p.add_argument("path", help="run folder <save>/<model_unique>, a train_stats folder or a .jsonl file")
    p.add_argument("-o", "--output", default=None, help="PNG to write (default: <path>/curves.png or next to the file)")
    p.add_argument("--no-tasks", action="store_true", help="do not draw per-task losses")
    return p


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    out = args.output or (path / "curves.png" if path.is_dir() else path.with_suffix(".png"))
    try:
        written = plot_run(path, out, tasks=not args.no_tasks)
    except ImportError as err:
        print(f"fm9g plot: error: {err}")
        return 1
    print(f"wrote {written}")
    return 0
