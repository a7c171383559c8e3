"""The first hour on a cluster (issue 32): one writer per run folder, SIGINT / SIGTERM with exact
resume, and step figures that leave out checkpoints (real `fm9g train` processes on a CPU)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fm9g
from fm9g.training import checkpoint as ck
from fm9g.training.interrupts import RunInterrupted
from fm9g.training.metrics import read_train_stats
from fm9g.training.run_lock import LOCK_NAME, RunLock, RunLockedError, read_lock
from fm9g.training.step_clock import StepClock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "FM9G_DEBUG": ""}
TINY_MODEL = {"vocab_size": 512, "dim_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "dim_ff": 64}
# a transform that sleeps FM9G_TEST_SLOW seconds per record: a run that takes long enough to be interrupted
SLOW_TRANSFORM = ("import os, time\n"
                  "def transform(data, num_sample, r):\n"
                  "    time.sleep(float(os.environ.get('FM9G_TEST_SLOW', '0')))\n"
                  "    return {'input': data.get('input', ''), 'output': data['output']}\n")


def _config(tmp_path: Path, **values) -> Path:
    """A tiny CPU run of the real pipeline (toy tokenizer, an index, a mixture with a transform file)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from _toy import make_toy_tokenizer, write_text_jsonl
    finally:
        sys.path.remove(str(ROOT / "examples"))
    fm9g.build_index(write_text_jsonl(tmp_path / "text.jsonl"), tmp_path / "idx", language="en")
    (tmp_path / "slow.py").write_text(SLOW_TRANSFORM)
    (tmp_path / "mix.json").write_text(json.dumps([{"dataset_name": "t", "task_name": "t", "path": "idx",
                                                    "abs_weight": 1.0, "transforms": "slow.py",
                                                    "allow_repeat": True}]))
    cfg = {"model": TINY_MODEL, "tokenizer_path": str(make_toy_tokenizer(tmp_path / "tok")), "dataset_config": "mix.json",
           "train_iters": 12, "save_iters": 2, "save": "ckpt", "max_length": 32, "lr": 1e-3, "warmup_iters": 2,
           "progress_bar": False, "tensorboard": None, "seed": 5, **values}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(cfg))
    return path


def _train(config: Path, *sets: str, slow: float = 0.0) -> subprocess.Popen:
    args = [sys.executable, "-m", "fm9g", "train", "--config", str(config)] + [a for s in sets for a in ("--set", s)]
    return subprocess.Popen(args, cwd=config.parent, env={**ENV, "FM9G_TEST_SLOW": str(slow)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not pred():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _stats_lines(run: Path) -> list[dict]:
    files = sorted((run / "train_stats").glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- one writer per folder
def test_two_runs_started_together_one_trains_the_other_is_refused(tmp_path):
    config = _config(tmp_path, train_iters=8)
    a, b = _train(config, slow=0.05), _train(config, slow=0.05)
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (a.returncode, err_a[-2000:], b.returncode, err_b[-2000:])
    refused = err_a if a.returncode else err_b
    run = tmp_path / "ckpt" / "fm9g"
    assert f"run folder {run} is in use by another training run" in refused
    assert f"host {socket.gethostname()}, pid " in refused
    # the run that trained is a run alone: its checkpoints, one stats row per step, nothing moved aside
    assert [s for s, _ in ck.list_checkpoints(run)] == [2, 4, 6, 8]
    assert [r["iteration"] for r in _stats_lines(run)] == list(range(1, 9))
    assert not (run / "abandoned").exists() and not (run / LOCK_NAME).exists()


def test_a_resume_while_the_run_trains_is_refused_within_seconds(tmp_path):
    # long enough (>= 20 s) that the first run is still mid-training when Ctrl-C comes, however slowly
    # the second process starts on a loaded machine (at 40 steps it once finished first: exit -2)
    config = _config(tmp_path, train_iters=400)
    run = tmp_path / "ckpt" / "fm9g"
    first = _train(config, slow=0.05)
    _wait_for(lambda: (run / "2").is_dir() or first.poll() is not None, 120, "the first checkpoint")
    assert first.poll() is None, first.communicate()[1][-2000:]
    holder = read_lock(run)
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    from fm9g.commands.inspect import inspect_path

    assert f"training now (host {socket.gethostname()}, pid {first.pid}" in inspect_path(run)
    t0 = time.time()
    second = _train(config, "resume_ckpt=latest")
    out, err = second.communicate(timeout=120)
    took = time.time() - t0
    assert second.returncode == 2 and f"run folder {run} is in use" in err and f"pid {first.pid}" in err, err[-2000:]
    assert first.poll() is None, "the first run should still be training when the second was refused"
    assert took < 60, took
    print(f"second writer refused {took:.1f} s after it started (interpreter, imports, model build included)")
    first.send_signal(signal.SIGINT)  # Ctrl-C: the first run stops after its step in hand (exit 130)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, err[-2000:]
    last = max(r["iteration"] for r in _stats_lines(run))
    assert [r["iteration"] for r in _stats_lines(run)] == list(range(1, last + 1))  # one row per step, no other run's
    steps = [s for s, _ in ck.list_checkpoints(run)]
    assert steps == sorted(set(list(range(2, last + 1, 2)) + [last])) and not (run / "abandoned").exists()
    assert not (run / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_line(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "run"
    run.mkdir()
    t = time.time() - 10
    (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "start": t,
                                             "heartbeat": t, "token": "old"}))
    lines: list[str] = []
    with RunLock(run, say=lines.append, heartbeat_s=0.05) as lock:
        assert read_lock(run)["pid"] == os.getpid()
        assert len(lines) == 1 and f"pid {int(dead.stdout)}" in lines[0] and "is not running" in lines[0]
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()  # a live holder (this process) is never taken over
        beat = read_lock(run)["heartbeat"]
        _wait_for(lambda: read_lock(run)["heartbeat"] > beat, 10, "a heartbeat")
        assert lock.record is not None
    assert not (run / LOCK_NAME).exists()
    # another host's lock is stale only when its heartbeat stopped
    (run / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": t, "heartbeat": time.time(),
                                             "token": "x"}))
    with pytest.raises(RunLockedError, match="host elsewhere, pid 1"):
        RunLock(run).acquire()
    with RunLock(run, say=lines.append, stale_after_s=0.0):
        assert "heartbeat was" in lines[-1]


# ----------------------------------------------------------------------------- interrupts
def _losses(run: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_train_stats(run)}


def test_sigterm_during_a_step_saves_it_exits_143_and_resumes_exactly(tmp_path, monkeypatch):
    from fm9g.cli import main

    config = _config(tmp_path, train_iters=8)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(config), "--set", "model_unique=straight"]) == 0
    straight = _losses(tmp_path / "ckpt" / "straight")
    run = tmp_path / "ckpt" / "fm9g"
    proc = _train(config, slow=0.1)
    _wait_for(lambda: (run / "train_stats" / "0.jsonl").is_file()
              and len((run / "train_stats" / "0.jsonl").read_text().splitlines()) >= 3, 120, "three steps")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    step = max(_losses(run))
    assert 3 <= step < 8
    resume = f"fm9g train --config {config} --set resume_ckpt=latest"
    assert f"interrupted at step {step}; checkpoint {run / str(step)}; resume with: {resume}" in out, out[-2000:]
    assert "SIGTERM received during step" in out and "Traceback" not in err
    assert ck.latest_checkpoint(run) == run / str(step)
    from fm9g.commands.inspect import inspect_path

    shown = inspect_path(run)
    assert f"run folder {run}: step {step} of train_iters=8; not finished" in shown
    assert f"last loss {_losses(run)[step]:.4f} at step {step}" in shown and f"latest: {run / str(step)}" in shown
    assert main(resume.split()[1:]) == 0
    assert f"step 8 of train_iters=8; finished" in inspect_path(run)
    assert _losses(run) == straight
    a, b = (torch.load(d / "8" / "fm9g_live_checkpoint-8.pt", weights_only=True)
            for d in (tmp_path / "ckpt" / "straight", run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_twice_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    from fm9g.cli import main

    config = _config(tmp_path, train_iters=8)
    run = tmp_path / "ckpt" / "fm9g"
    real = ck._write_file
    kills = {"n": 0}

    def write_and_get_killed(path, write, binary=True):
        if "-6" in Path(path).name and kills["n"] < 2:  # the save of step 6: two SIGTERMs while writing
            kills["n"] += 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, write, binary)

    monkeypatch.setattr(ck, "_write_file", write_and_get_killed)
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", str(config)])
    captured = capsys.readouterr()
    assert code == 143, captured.err[-2000:]
    assert "SIGTERM received again: stopping at once" in captured.err
    assert "the checkpoint being saved was interrupted and is not kept" in captured.err
    assert f"the last whole checkpoint is {run / '4'}" in captured.err and "disk" not in captured.err
    assert [s for s, _ in ck.list_checkpoints(run)] == [2, 4] and not list(run.glob(".tmp-*"))
    assert not (run / LOCK_NAME).exists()
    monkeypatch.setattr(ck, "_write_file", real)
    assert main(["train", "--config", str(config), "--set", "resume_ckpt=latest"]) == 0
    resumed = _losses(run)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(config), "--set", "model_unique=straight"]) == 0
    assert resumed == _losses(tmp_path / "ckpt" / "straight")


def test_a_folder_with_only_train_stats_does_not_block_a_restart(tmp_path):
    config = _config(tmp_path)
    run = tmp_path / "ckpt" / "fm9g"
    (run / "train_stats").mkdir(parents=True)
    (run / "train_stats" / "0.jsonl").write_text(json.dumps({"iteration": 1, "loss": 9.0}) + "\n")
    done = subprocess.run([sys.executable, "-m", "fm9g", "train", "--config", str(config), "--set", "train_iters=2"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["iteration"] for r in read_train_stats(run)] == [1, 2]


# ----------------------------------------------------------------------------- true figures
class _SteadyLoader:
    """The same packed batch every step (2 rows x 16 tokens), with a state."""
    batch_size, max_length = 2, 16

    def __init__(self):
        self.i = 0

    def __iter__(self):
        while True:
            self.i += 1
            ids = torch.arange(32).reshape(2, 16) % 90 + 3
            yield {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": torch.arange(16).repeat(2, 1),
                   "cu_seqlens": torch.tensor([0, 16, 32], dtype=torch.int32), "task_ids": torch.zeros(2, 16, dtype=torch.long),
                   "task_names": ["t"], "num_tokens": 32, "num_label_tokens": 32}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


class _FakeTime:
    """A clock that only moves when told: a step takes 1 s of host time to launch, a save 7 s."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("ahead", [False, True], ids=["waiting", "launch-ahead"])
def test_every_row_has_true_tokens_per_s_with_saves_and_on_the_last_step(tmp_path, ahead):
    from fm9g.training.config import TrainConfig
    from fm9g.training.trainer import Trainer

    cfg = TrainConfig(model="tiny", train_iters=9, lr=1e-3, warmup_iters=1, save=str(tmp_path / "ckpt"),
                      save_iters=2, max_length=16, batch_size=2, progress_bar=False, tensorboard=None,
                      stats_dir="auto", peak_flops=1e6)
    t = Trainer(cfg, loader=_SteadyLoader())
    fake = _FakeTime()
    t.clock = StepClock(fake)
    t.engine._device_lr, t.engine.launch_ahead = True, ahead
    inner_step, inner_save = t.engine.train_step, t.save

    def slow_step(batches, lr, **kw):  # host-bound: launching a step costs 1 s
        fake.t += 1.0
        return inner_step(batches, lr, **kw)

    def slow_save():
        fake.t += 7.0
        return inner_save()

    t.engine.train_step, t.save = slow_step, slow_save
    t.fit()
    rows = read_train_stats(cfg.run_dir)
    assert [r["iteration"] for r in rows] == list(range(1, 10))
    tps = [r["tokens_per_s"] for r in rows]
    for i, r in enumerate(rows):
        assert r["iter_time"] == pytest.approx(1.0), (i + 1, [x["iter_time"] for x in rows])
        for j in (i - 1, i + 1):
            if 0 <= j < len(rows):
                assert abs(tps[i] - tps[j]) <= 0.1 * tps[j], (i + 1, tps)
        assert r["mfu"] is None or r["mfu"] <= 1.0
    assert [r.get("save_time") for r in rows] == [None, 7.0, None, 7.0, None, 7.0, None, 7.0, None]


def test_step_clock_counts_neither_pauses_nor_a_queued_step_short():
    fake = _FakeTime()
    clock = StepClock(fake)
    fake.t = 1.0
    assert clock.settled(0.0) == (1.0, 1.0)  # the first step: from the start of the loop
    with clock.paused():
        fake.t += 5.0
    launch = fake.t
    fake.t += 2.0
    assert clock.settled(launch) == (2.0, 2.0)  # the pause is no step's time
    # a step queued 1.5 s after the previous launch, before that one settled, that settles at once
    assert clock.settled(launch + 1.5)[0] == pytest.approx(1.5)
    assert clock.settled(launch + 4.0, launch + 7.0)[0] == pytest.approx(3.0)  # the next one is queued already


# ----------------------------------------------------------------------------- nothing silent
DROPPING_TRANSFORM = ("def transform(data, num_sample, r):\n"
                      "    if 'Poseidonia' in data['output']:\n"
                      "        return None\n"
                      "    return {'input': data.get('input', ''), 'output': data['output']}\n")


def test_dropped_records_a_long_warmup_and_the_schedule_are_said(tmp_path, monkeypatch):
    import io

    from fm9g.training.config import TrainConfig
    from fm9g.training.trainer import Trainer

    config = _config(tmp_path, train_iters=3, warmup_iters=20, stats_dir="auto")
    (tmp_path / "slow.py").write_text(DROPPING_TRANSFORM)
    out = io.StringIO()
    result = Trainer(TrainConfig.from_json(config), log_stream=out).fit()
    text = out.getvalue()
    assert "lr 0.001 cosine: warmup to step 20, then cosine down to 10% at step 3; 3 steps" in text
    assert "warning: warmup_iters is 20 steps, not shorter than train_iters=3: the learning rate only rises" in text
    rows = read_train_stats(tmp_path / "ckpt" / "fm9g")
    dropped = sum(r.get("dropped", {}).get("t", {}).get("the transform returned None", 0) for r in rows)
    assert dropped > 0 and result.dropped == {"t": {"the transform returned None": dropped}}
    assert f"dropped: t " in text and "(the transform returned None " in text
    assert "max|x|" not in text  # no parameter table unless inspect_iters asks


def test_no_mfu_above_peak_and_no_progress_bar_off_a_terminal(tmp_path):
    import io

    from fm9g.training.metrics import MetricsLogger, mfu

    assert mfu(1000.0, 1e6, 1e12) == pytest.approx(1e-3)
    assert mfu(49_612_983.0, 1e9, 989e12) is None  # the 247643.9%: a wrong time, never shown
    out = io.StringIO()  # not a terminal: lines only, no \r updates
    logger = MetricsLogger(total_steps=3, progress_bar=True, stream=out, stats_dir=None)
    assert logger.bar is None
    logger.log(1, {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "mfu": None})
    assert "\r" not in out.getvalue() and "MFU" not in out.getvalue()
    logger.close()


def test_torchrun_rank_0_holds_the_lock_and_every_rank_hears_a_refusal(tmp_path):
    from fm9g.training.run_lock import acquire_for_run

    run = tmp_path / "run"
    lock = acquire_for_run(run, is_main=True, agree=lambda x: x)  # rank 0 of a job
    try:
        assert read_lock(run)["pid"] == os.getpid()
        assert acquire_for_run(run, is_main=False, agree=lambda x: x) is None  # another rank: no lock of its own
        # a second job: its rank 0 is refused, and its other ranks hear it through the all-reduce
        with pytest.raises(RunLockedError, match="in use by another training run"):
            acquire_for_run(run, is_main=True, agree=lambda x: x)
        with pytest.raises(RunLockedError, match="rank 0 says so"):
            acquire_for_run(run, is_main=False, agree=lambda x: x + 1.0)
    finally:
        lock.release()
    assert not (run / LOCK_NAME).exists() and not run.exists()  # the folder it made, empty, is gone too


def test_sigterm_under_torchrun_saves_the_step_in_hand_on_every_rank_and_resumes_exactly(tmp_path, monkeypatch):
    """Slurm preemption of a torchrun job: torchrun passes SIGTERM on to its ranks, which agree on
    one step (gloo flag), save it together and print the resume line once; the resumed job trains
    as an uninterrupted one."""
    import socket as _socket

    def torchrun(*sets: str, slow: float = 0.0) -> subprocess.Popen:
        with _socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", "-m", "fm9g", "train", "--config", str(config)]
        env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        return subprocess.Popen(cmd + [a for s in sets for a in ("--set", s)], cwd=tmp_path, text=True,
                                env={**env, "OMP_NUM_THREADS": "1", "FM9G_TEST_SLOW": str(slow)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    config = _config(tmp_path, train_iters=6, device="cpu", compile=False)
    straight = torchrun("model_unique=straight")
    out, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]
    run = tmp_path / "ckpt" / "fm9g"
    job = torchrun(slow=0.2)
    _wait_for(lambda: (run / "train_stats" / "0.jsonl").is_file()
              and len((run / "train_stats" / "0.jsonl").read_text().splitlines()) >= 2, 300, "two steps")
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=300)
    step = max(_losses(run))
    assert 2 <= step < 6 and (run / str(step)).is_dir(), (out[-2000:], err[-3000:])
    assert out.count(f"interrupted at step {step}; checkpoint {run / str(step)}; resume with: ") == 1, out[-3000:]
    resumed = torchrun("resume_ckpt=latest")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert _losses(run) == _losses(tmp_path / "ckpt" / "straight")
