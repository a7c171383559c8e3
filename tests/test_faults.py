"""Fault injection: at least 20 seeded random kills during training and saving, each followed by a
resume that continues the uninterrupted run's losses exactly and ends with its weights bit for bit.

One subprocess (one torch thread, so ``os.fork`` never copies a busy OpenMP pool) orchestrates: a forked child trains the reference run; then forked children
train the same run in another folder, each resuming from ``latest`` and killed by ``os._exit`` at a
random event: before a train step, at a checkpoint file write (leaving a torn file behind), at a
rename (a finished checkpoint folder moved into place, a pruned one moved out). Every loss a child
reports must equal the reference loss of that step, every child must start right after the latest
complete checkpoint, and each run finished after its kills must hold the reference's final weights.
All processes share one thread count (exact resume is promised for the same code, world size,
device type and torch thread count: docs/checkpoints.md).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILLED = 137
STEPS = 6


def test_random_kills_during_training_and_saving_resume_exactly(tmp_path):
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(Path(__file__)), str(tmp_path), "20260515", "20"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["kills"] >= 20 and summary["runs_finished"] >= 2, summary
    assert summary["killed_in"]["step"] and summary["killed_in"]["write"] and summary["killed_in"]["rename"], summary
    assert time.perf_counter() - t0 < 120, "the fault test must stay fast"


# ---------------------------------------------------------------------------------- the worker
def _config(root: Path, run: str):
    from fm9g.training.config import TrainConfig

    return TrainConfig(model={"vocab_size": 99, "dim_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                              "dim_ff": 64, "tie_lm_head": True},
                       train_iters=STEPS, lr=3e-3, warmup_iters=2, save=str(root / "ckpt"), model_unique=run,
                       save_iters=1, keep_last=2, max_length=16, batch_size=2, progress_bar=False, inspect_iters=0,
                       seed=7, tensorboard=None, stats_dir=None, log_iters=100, device="cpu", use_checkpoint=False)


def _train_child(root: Path, run: str, kill_at: int, report: int, loader_cls) -> None:
    """In a forked child: train `run` from its latest checkpoint; os._exit at event `kill_at`."""
    import fm9g._io as fio
    import fm9g.training.checkpoint as ck
    from fm9g.training.trainer import Trainer

    count = {"n": 0}

    def event(kind: str, torn: Path | None = None) -> None:
        count["n"] += 1
        if count["n"] == kill_at:
            if torn is not None:
                torn.write_bytes(b"torn")
            os.write(report, f"killed {kind}\n".encode())
            os._exit(KILLED)

    real_write, real_replace = ck._write_file, os.replace
    real_launch, real_settle = Trainer._launch, Trainer._settle  # the two halves of a step in fit()

    def write(path, fn, binary=True):
        event("write", torn=path)
        real_write(path, fn, binary)

    def replace(src, dst):
        event("rename")
        real_replace(src, dst)

    def launch(self, batches):
        event("step")
        return real_launch(self, batches)

    def settle(self, out, batches):
        out = real_settle(self, out, batches)
        os.write(report, f"loss {self.step} {out.loss!r}\n".encode())
        return out

    ck._write_file, fio.os.replace = write, replace   # this child only
    Trainer._launch, Trainer._settle = launch, settle
    cfg = _config(root, run)
    resume = bool(ck.list_checkpoints(cfg.run_dir))
    with open(os.devnull, "w") as quiet:
        trainer = Trainer(cfg.override({"resume_ckpt": "latest"}) if resume else cfg, loader=loader_cls(),
                          log_stream=quiet)
        if resume:
            trainer.resume("latest")
        os.write(report, f"start {trainer.step}\n".encode())
        trainer.fit()
    os.write(report, b"done\n")
    os._exit(0)


def _run_child(root: Path, run: str, kill_at: int, loader_cls) -> tuple[int, list[str]]:
    """Fork a child training `run`; returns its exit code and the lines it reported."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _train_child(root, run, kill_at, w, loader_cls)
        finally:
            os._exit(99)  # an exception in the child
    os.close(w)
    chunks = []
    while data := os.read(r, 65536):
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode().splitlines()


def _final_weights(root: Path, run: str) -> dict:
    import torch

    folder = root / "ckpt" / run / str(STEPS)
    return torch.load(folder / f"fm9g_live_checkpoint-{STEPS}.pt", weights_only=True)


def main(root: Path, seed: int, kills_wanted: int) -> None:
    import torch

    # One thread: fast on a busy machine, no OpenMP pool to fork, and the same count in every child.
    torch.set_num_threads(1)
    import fm9g.models.fm9g  # noqa: F401 - imported once here, not in every child
    import fm9g.training.checkpoint as ck
    import fm9g.training.trainer  # noqa: F401

    sys.path.insert(0, str(ROOT / "tests"))
    from test_trainer import LOADER_SRC

    ns: dict = {}
    exec(LOADER_SRC, ns)
    loader_cls = ns["ToyLoader"]
    code, lines = _run_child(root, "reference", 0, loader_cls)
    assert code == 0, lines
    reference = {int(s): loss for _, s, loss in (ln.split() for ln in lines if ln.startswith("loss "))}
    assert sorted(reference) == list(range(1, STEPS + 1)), lines
    want = _final_weights(root, "reference")

    rng = random.Random(seed)
    kills, finished, episode, run_in_progress = 0, 0, 0, False
    killed_in = {"step": 0, "write": 0, "rename": 0}
    run = f"run{episode}"
    while kills < kills_wanted or finished == 0 or run_in_progress:
        code, lines = _run_child(root, run, rng.randint(1, 24), loader_cls)
        run_dir = root / "ckpt" / run
        starts = [int(ln.split()[1]) for ln in lines if ln.startswith("start ")]
        for ln in lines:
            if ln.startswith("loss "):
                _, s, loss = ln.split()
                assert loss == reference[int(s)], f"{run}: step {s} loss {loss} != {reference[int(s)]} ({lines})"
        got = [int(ln.split()[1]) for ln in lines if ln.startswith("loss ")]
        if starts and got:
            assert got[0] == starts[0] + 1, lines
        if code == KILLED:
            kills += 1
            killed_in[lines[-1].split()[1]] += 1
            run_in_progress = True
            continue
        assert code == 0 and lines[-1] == "done", (code, lines)
        latest = ck.resolve_checkpoint(run_dir, "latest")
        assert latest == run_dir / str(STEPS), latest
        weights = _final_weights(root, run)
        assert weights.keys() == want.keys() and all(torch.equal(weights[k], want[k]) for k in want), run
        finished += 1
        episode += 1
        run, run_in_progress = f"run{episode}", False
    print(json.dumps({"kills": kills, "runs_finished": finished, "killed_in": killed_in}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
