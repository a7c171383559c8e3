"""A rank killed with SIGKILL mid-run under a real ``torchrun --nproc_per_node=2`` (gloo, CPU), as the
OOM killer or a preemption would: the other rank, waiting for it in a collective, stops within
FM9G_DIST_TIMEOUT with one line naming the dead rank; nothing hangs; the last checkpoint is whole
and the run resumes from it with the losses and weights of a run that was never killed.

The test has its own deadline (`DEADLINE_S`): a process that hangs fails it instead of the suite.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 90.0  # from the kill to every process gone; FM9G_DIST_TIMEOUT below is 20
DIST_TIMEOUT_S = 20
# a transform that sleeps per record on rank 1 only: rank 0 reaches each step's collectives first and
# waits there for rank 1, which is where the kill finds it
SLOW_ON_RANK_1 = ("import os, time\n"
                  "def transform(data, num_sample, r):\n"
                  "    if os.environ.get('RANK') == '1':\n"
                  "        time.sleep(0.15)\n"
                  "    return {'input': data['input'], 'output': data['output']}\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FM9G_DIST_TIMEOUT=str(DIST_TIMEOUT_S))
    return env


def _config(tmp: Path, name: str, **kw) -> Path:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from _toy import make_toy_tokenizer, write_text_jsonl
    finally:
        sys.path.pop(0)
    from fm9g import build_index

    if not (tmp / "index").exists():
        make_toy_tokenizer(tmp / "tok")
        build_index(write_text_jsonl(tmp / "text.jsonl"), tmp / "index", language="en")
        (tmp / "slow.py").write_text(SLOW_ON_RANK_1)
        (tmp / "data.json").write_text(json.dumps([{"dataset_name": "text", "task_name": "text", "path": "index",
                                                    "abs_weight": 1, "transforms": "slow.py", "allow_repeat": True}]))
    cfg = {"model": {"vocab_size": 512, "dim_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
                     "dim_head": 16, "dim_ff": 64, "tie_lm_head": False},
           "tokenizer_path": str(tmp / "tok"), "data": str(tmp / "data.json"), "train_iters": 8, "lr": 3e-3,
           "warmup_iters": 1, "max_length": 32, "batch_size": 1, "save": str(tmp / "runs"), "save_iters": 2,
           "progress_bar": False, "inspect_iters": 0, "tensorboard": None, "stats_dir": "auto",
           "seed": 3, "device": "cpu", "compile": False, "num_workers": 0, "model_unique": name, **kw}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _torchrun(config: Path, *sets: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "fm9g", "train", "--config", str(config)]
    cmd += [a for s in sets for a in ("--set", s)]
    return subprocess.Popen(cmd, cwd=config.parent, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _stats(run: Path) -> dict[int, float]:
    rows = {}
    for f in sorted((run / "train_stats").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[r["iteration"]] = r["loss"]
    return rows


def _rank_pids(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's workers: the children of ``launcher`` with RANK set."""
    out = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if ppid == launcher else []
        except (OSError, ValueError, IndexError):
            continue
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ranks:
            out[int(ranks[0])] = pid
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def test_a_rank_killed_mid_run_stops_the_other_with_its_name_and_the_run_resumes_exactly(tmp_path):
    ref = _torchrun(_config(tmp_path, "ref"))
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-2000:] + err[-3000:]
    reference = _stats(tmp_path / "runs" / "ref")
    assert sorted(reference) == list(range(1, 9))

    run = tmp_path / "runs" / "killed"
    proc = _torchrun(_config(tmp_path, "killed"))
    pids: dict[int, int] = {}
    try:
        _wait(lambda: 5 in _stats(run) if (run / "train_stats").exists() else False, 240, "step 5 of the run")
        pids = _rank_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)  # rank 0 is, or soon will be, waiting for it in a collective
        t_kill = time.monotonic()
        try:
            out, err = proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"a process still ran {DEADLINE_S:.0f}s after rank 1 was killed") from None
        _wait(lambda: not any(_alive(p) for p in pids.values()), 10, "every rank to exit")
        stopped_s = time.monotonic() - t_kill
    finally:
        for pid in [proc.pid, *pids.values()]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    named = [ln for ln in (out + err).splitlines() if "rank 1" in ln and "died" in ln]
    assert len(named) >= 1, (out + err)[-4000:]
    assert stopped_s < DIST_TIMEOUT_S + 30, stopped_s

    # the last checkpoint is whole, and the run resumes from it exactly
    from fm9g.training.checkpoint import latest_checkpoint, list_checkpoints

    last = latest_checkpoint(run)
    assert last is not None and int(last.name) >= 4 and last == list_checkpoints(run)[-1][1], list_checkpoints(run)
    again = _torchrun(_config(tmp_path, "killed"), "resume_ckpt=latest")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, out[-2000:] + err[-3000:]
    resumed, step = _stats(run), int(last.name)
    assert [resumed[i] for i in range(step + 1, 9)] == [reference[i] for i in range(step + 1, 9)]
    a = torch.load(tmp_path / "runs" / "ref" / "8" / "fm9g_live_checkpoint-8.pt", weights_only=True)
    b = torch.load(run / "8" / "fm9g_live_checkpoint-8.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
