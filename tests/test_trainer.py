"""The Trainer on CPU: exact resume across processes (full and LoRA), crash safety, overfitting,
loss on output tokens only, accumulation, non-finite / OOM skipping, TensorBoard, stats, plot, CLI."""
import io
import json
import struct
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from fm9g.training import checkpoint as ck
from fm9g.training.config import TrainConfig
from fm9g.training.torch_engine import TorchEngine
from fm9g.training.trainer import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]

# A deterministic stand-in for MixtureLoader (packed rows with cu_seqlens, 2 tasks, state_dict).
LOADER_SRC = textwrap.dedent('''
    import torch

    class ToyLoader:
        task_names = ["alpha", "beta"]

        def __init__(self, seed=0, vocab=99, crash_after=None, fixed=False):
            self.i, self.seed, self.vocab, self.crash_after, self.fixed = 0, seed, vocab, crash_after, fixed

        def __iter__(self):
            while True:
                if self.crash_after is not None and self.i >= self.crash_after:
                    raise KeyboardInterrupt("simulated kill")
                b = self.make(0 if self.fixed else self.i)
                self.i += 1
                yield b

        def make(self, i):
            g = torch.Generator().manual_seed(self.seed * 100003 + i)
            ids = torch.randint(3, self.vocab, (2, 16), generator=g)      # 2 rows x 16, 2 docs per row
            labels = torch.roll(ids, -1, 1)
            labels[:, [0, 1, 2, 7, 8, 9, 10, 15]] = -100                  # prompts and document ends
            pos = torch.arange(8).repeat(2).expand(2, 16).clone()
            task = torch.tensor([[0] * 16, [1] * 16])
            return {"input_ids": ids, "labels": labels, "position_ids": pos,
                    "cu_seqlens": torch.tensor([0, 8, 16, 24, 32], dtype=torch.int32), "task_ids": task,
                    "task_names": list(self.task_names), "num_tokens": 32,
                    "num_label_tokens": int((labels != -100).sum())}

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, state):
            self.i = int(state["i"])
''')
_ns: dict = {}
exec(LOADER_SRC, _ns)
ToyLoader = _ns["ToyLoader"]

RESUME_SCRIPT = LOADER_SRC + textwrap.dedent('''
    import json, sys
    from fm9g.training.config import TrainConfig
    from fm9g.training.trainer import Trainer
    cfg = TrainConfig.from_json(sys.argv[1]).override(sys.argv[2:])
    res = Trainer(cfg, loader=ToyLoader()).fit()
    print("RESULT " + json.dumps({"losses": res.losses, "step": res.step}))
''')


def _cfg(tmp_path, **kw):
    base = dict(model="tiny", train_iters=6, lr=3e-3, warmup_iters=2, lr_scheduler="cosine", save=str(tmp_path / "ckpt"),
                save_iters=0, max_length=16, batch_size=2, progress_bar=False, inspect_iters=0, seed=7,
                tensorboard=None, stats_dir=None)
    base.update(kw)
    return TrainConfig(**base)


def _final_state(run_dir, step):
    return torch.load(Path(run_dir) / str(step) / f"fm9g_live_checkpoint-{step}.pt", weights_only=True)


def _resume_in_new_process(tmp_path, cfg, *sets):
    cfg_path = tmp_path / "resume.json"
    cfg.to_json(cfg_path)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(cfg_path), *sets], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("lora, optimizer", [(False, "adamw"), (True, "adamw"), (False, "adamw_bf16"),
                                             (False, "adamw_master")],
                         ids=["full", "lora", "full-adamw_bf16", "full-adamw_master"])
def test_exact_resume_in_a_new_process(tmp_path, lora, optimizer):
    N, k = 6, 3
    extra = {"optimizer": optimizer}
    if optimizer == "adamw_master":  # bf16 compute weights with fp32 masters (bf16 autocast on the CPU)
        extra["precision"] = "bf16"
    if lora:
        # LoRA on top of pretrained weights, with dropout so the RNG state matters
        from fm9g.models.config import FM9GConfig
        from fm9g.models.fm9g import FM9GModel

        torch.manual_seed(123)
        torch.save(FM9GModel(FM9GConfig.from_name("tiny")).state_dict(), tmp_path / "base.pt")
        extra.update(pretrained_model=str(tmp_path / "base.pt"),
                     lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["project_q", "project_v", "w_out"]})
    straight = _cfg(tmp_path, model_unique="straight", **extra)
    res_a = Trainer(straight, loader=ToyLoader()).fit()
    assert res_a.step == N and len(res_a.losses) == N

    part = _cfg(tmp_path, model_unique="split", save_iters=k, **extra)
    with pytest.raises(KeyboardInterrupt):  # killed while fetching the data of step k+1
        Trainer(part, loader=ToyLoader(crash_after=k)).fit()
    assert [s for s, _ in ck.list_checkpoints(part.run_dir)] == [k]

    res_b = _resume_in_new_process(tmp_path, part, "resume_ckpt=latest")
    assert res_b["step"] == N
    assert res_b["losses"] == res_a.losses[k:]  # identical floats
    a, b = _final_state(straight.run_dir, N), _final_state(part.run_dir, N)
    assert a.keys() == b.keys()
    if lora:
        assert all(".lora.lora_" in key for key in a), "LoRA checkpoints hold only LoRA tensors"
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if optimizer == "adamw_master":  # the checkpoint holds the fp32 masters, not the bf16 compute weights
        w = a["encoder.layers.0.self_att.self_attention.project_q.weight"]
        assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())
    oa = torch.load(Path(straight.run_dir) / str(N) / f"fm9g_live_checkpoint-{N}.rank-0.opt", weights_only=True)
    ob = torch.load(Path(part.run_dir) / str(N) / f"fm9g_live_checkpoint-{N}.rank-0.opt", weights_only=True)
    for i, st in oa["state"].items():
        assert torch.equal(st["exp_avg_sq"], ob["state"][i]["exp_avg_sq"])


@pytest.mark.parametrize("fail_at", range(7))
def test_crash_during_save_keeps_previous_and_resume_picks_it(tmp_path, monkeypatch, fail_at):
    cfg = _cfg(tmp_path, train_iters=4, save_iters=2, save_final=False)
    real = ck._write_file
    calls = {"n": 0}

    def flaky(path, write, binary=True):
        # the first save (step 2: 7 files) succeeds, the second fails at file `fail_at`
        if calls["n"] == 7 + fail_at:
            calls["n"] += 1
            path.write_bytes(b"half")
            raise OSError("disk full (injected)")
        calls["n"] += 1
        return real(path, write, binary)

    monkeypatch.setattr(ck, "_write_file", flaky)
    with pytest.raises(OSError, match="injected"):
        Trainer(cfg, loader=ToyLoader()).fit()
    monkeypatch.setattr(ck, "_write_file", real)
    assert [s for s, _ in ck.list_checkpoints(cfg.run_dir)] == [2]
    resumed = Trainer(cfg.override({"resume_ckpt": "latest"}), loader=ToyLoader())
    assert resumed.resume("latest") == cfg.run_dir / "2"
    assert resumed.step == 2 and resumed.loader.i == 2
    assert resumed.fit().step == 4


def test_tiny_model_overfits_a_small_sft_set(tmp_path):
    """6 chat Q/A pairs through the real pipeline (index, chatml transform, packing): the loss on the
    answers falls far below its start."""
    sys.path.insert(0, str(ROOT / "examples"))
    from _toy import make_toy_tokenizer, write_sft_jsonl

    from fm9g import FM9GConfig, build_index

    tok = make_toy_tokenizer(tmp_path / "tok")
    build_index(write_sft_jsonl(tmp_path / "chat.jsonl", repeat=1), tmp_path / "index", language="en")
    (tmp_path / "mix.json").write_text(json.dumps(
        [{"dataset_name": "c", "task_name": "c", "path": str(tmp_path / "index"), "abs_weight": 1, "transforms": "chatml"}]))
    cfg = _cfg(tmp_path, model=FM9GConfig.from_name("tiny", vocab_size=512), tokenizer_path=str(tok),
               data=str(tmp_path / "mix.json"), lr=2e-2, warmup_iters=3, lr_scheduler="constant", train_iters=40,
               batch_size=3, max_length=96, save=None, log_iters=100)
    res = Trainer(cfg).fit()
    assert res.losses[0] > 5.0  # ~ ln(512)
    assert res.losses[-1] < 0.25 * res.losses[0], res.losses


def test_loss_is_mean_over_output_tokens_across_accumulation():
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel

    torch.manual_seed(0)
    model = FM9GModel(FM9GConfig.from_name("tiny"))
    ids1 = torch.tensor([[5, 6, 7, 8, 9, 10]])
    lab1 = torch.tensor([[-100, -100, -100, -100, 10, 11]])  # 2 output tokens
    ids2 = torch.tensor([[20, 21, 22, 23, 24, 25]])
    lab2 = torch.tensor([[-100, 22, 23, 24, 25, 26]])  # 5 output tokens
    with torch.no_grad():
        lp1 = torch.log_softmax(model(ids1).logits.float(), -1)[0]
        lp2 = torch.log_softmax(model(ids2).logits.float(), -1)[0]
    nll = [-lp1[4, 10], -lp1[5, 11]] + [-lp2[j, t] for j, t in zip(range(1, 6), (22, 23, 24, 25, 26))]
    want = float(sum(nll) / 7)  # mean over all 7 labelled tokens, not the mean of the two batch means
    engine = TorchEngine(model, lr=1e-3, device="cpu")
    out = engine.train_step([{"input_ids": ids1, "labels": lab1}, {"input_ids": ids2, "labels": lab2}], lr=0.0)
    assert out.num_label_tokens == 7
    assert out.loss == pytest.approx(want, rel=1e-5)
    # changing the prompt tokens' labels (-100 -> anything masked) cannot change the loss
    mean_of_means = float((sum(nll[:2]) / 2 + sum(nll[2:]) / 5) / 2)
    assert abs(out.loss - mean_of_means) > 1e-3


def test_accumulation_equals_one_big_batch():
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (2, 8), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # unequal label counts per micro-batch
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(FM9GModel(FM9GConfig.from_name("tiny")))
    e1 = TorchEngine(models[0], lr=1e-2, device="cpu")
    e2 = TorchEngine(models[1], lr=1e-2, device="cpu")
    grads = []
    for e in (e1, e2):  # record the gradients the optimizer sees
        step, seen = e.optimizer.step, []
        e.optimizer.step = (lambda step=step, seen=seen, e=e: (seen.extend(p.grad.clone() for p in e.params), step())[1])
        grads.append(seen)
    o1 = e1.train_step([{"input_ids": ids[:1], "labels": labels[:1]}, {"input_ids": ids[1:], "labels": labels[1:]}], lr=1e-2)
    o2 = e2.train_step([{"input_ids": ids, "labels": labels}], lr=1e-2)
    assert o1.loss == pytest.approx(o2.loss, rel=1e-6) and o1.grad_norm == pytest.approx(o2.grad_norm, rel=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


class _PoisonModel(nn.Module):
    """Contract-shaped toy: token_loss = (w·x)²; NaN when the batch's first token is 0; OOM when 1."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 1)

    def forward(self, input_ids, *, position_ids=None, cu_seqlens=None, max_seqlen=None, labels=None):
        if int(input_ids[0, 0]) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        tl = self.emb(input_ids)[..., 0] ** 2 * (labels != -100)
        if int(input_ids[0, 0]) == 0:
            tl = tl * float("nan")
        return types.SimpleNamespace(token_loss=tl, loss=None, num_label_tokens=(labels != -100).sum())


class _ListLoader:
    def __init__(self, firsts):
        self.firsts = list(firsts)

    def __iter__(self):
        for f in self.firsts:
            ids = torch.tensor([[f, 3, 4, 5]])
            yield {"input_ids": ids, "labels": ids.clone()}


def test_nonfinite_steps_are_skipped_counted_and_too_many_stop(tmp_path):
    cfg = _cfg(tmp_path, train_iters=3, save=None, max_bad_steps=3)
    t = Trainer(cfg, model=_PoisonModel(), loader=_ListLoader([2, 0, 0, 2, 2]))
    before = t.model.emb.weight.detach().clone()
    res = t.fit()
    assert res.step == 3 and res.skipped["nonfinite"] == 2 and len(res.losses) == 3
    assert not torch.equal(before, t.model.emb.weight)
    assert torch.isfinite(t.model.emb.weight).all()
    t2 = Trainer(cfg, model=_PoisonModel(), loader=_ListLoader([2] + [0] * 5))
    with pytest.raises(TrainingError, match="3 consecutive steps were skipped"):
        t2.fit()


def test_ignore_cuda_oom_skips_the_batch(tmp_path):
    cfg = _cfg(tmp_path, train_iters=2, save=None)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Trainer(cfg, model=_PoisonModel(), loader=_ListLoader([2, 1, 2])).fit()
    res = Trainer(cfg.override({"ignore_cuda_oom": True}), model=_PoisonModel(), loader=_ListLoader([2, 1, 2])).fit()
    assert res.step == 2 and res.skipped["oom"] == 1


def _read_scalars(logdir):
    """Parse tensorboardX event files (TFRecord framing + Event protos) without tensorboard."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = list(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir}"
    for f in files:
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_stats_plot_and_inspect(tmp_path, capsys):
    cfg = _cfg(tmp_path, train_iters=4, save_iters=2, tensorboard="auto", stats_dir="auto", keep_last=1)
    res = Trainer(cfg, loader=ToyLoader()).fit()
    scalars = _read_scalars(cfg.run_dir / "tensorboard")
    for tag in ("Loss/train", "Optimizer/lr", "Optimizer/grad_norm", "Loss/train/alpha", "Loss/train/beta"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
    assert [v for _, v in scalars["Loss/train"]] == pytest.approx(res.losses, rel=1e-6)
    assert scalars["Optimizer/lr"][0][1] == pytest.approx(3e-3 / 2)  # iteration 1 trains with lr(1) = base/W
    # per-task losses weight to the total loss by their label counts (equal here)
    t = (scalars["Loss/train/alpha"][0][1] + scalars["Loss/train/beta"][0][1]) / 2
    assert t == pytest.approx(res.losses[0], rel=1e-5)
    printed = capsys.readouterr().out
    assert "| Iter:      1 | loss:" in printed and "grad_norm:" in printed and "tokens/s:" in printed
    assert "task_loss: | alpha:" in printed
    from fm9g.training.metrics import read_train_stats

    rows = read_train_stats(cfg.run_dir)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and rows[-1]["token_pass"] == 128
    assert [s for s, _ in ck.list_checkpoints(cfg.run_dir)] == [4]  # keep_last=1
    from fm9g.cli import main

    png = tmp_path / "curves.png"
    assert main(["plot", str(cfg.run_dir), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(cfg.run_dir / "4")]) == 0
    out = capsys.readouterr().out
    assert "step 4" in out and "input_embedding.weight" in out


def test_resume_with_another_model_shape_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path, train_iters=2, save_iters=2)
    Trainer(cfg, loader=ToyLoader()).fit()
    other = cfg.override({"model": {"vocab_size": 99, "dim_model": 32, "num_layers": 2, "num_heads": 2,
                                    "num_kv_heads": 2, "dim_head": 16, "dim_ff": 64, "tie_lm_head": True},
                          "resume_ckpt": "latest"})
    with pytest.raises(ck.CheckpointError, match="dim_model: 64 in checkpoint"):
        Trainer(other, loader=ToyLoader()).fit()
    lora = cfg.override({"lora_r": 2, "resume_ckpt": "2"})
    with pytest.raises(ck.CheckpointError, match="written by a full run"):
        Trainer(lora, loader=ToyLoader()).fit()
    with pytest.raises(ck.CheckpointError, match="available steps: \\[2\\]"):
        Trainer(cfg.override({"resume_ckpt": "9"}), loader=ToyLoader()).fit()


def test_cli_train_end_to_end_with_the_real_data_pipeline(tmp_path, capsys):
    """jsonl -> build_index -> dataset config -> `fm9g train --config --set` -> checkpoint -> resume."""
    sys.path.insert(0, str(ROOT / "examples"))
    from _toy import make_toy_tokenizer, write_sft_jsonl

    from fm9g import build_index
    from fm9g.cli import main

    tok = make_toy_tokenizer(tmp_path / "tok")
    build_index(write_sft_jsonl(tmp_path / "chat.jsonl"), tmp_path / "index", language="en")
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "chat.json").write_text(json.dumps(
        [{"dataset_name": "chat", "task_name": "chat", "path": "../index", "abs_weight": 1, "transforms": "chatml"}]))
    (tmp_path / "model.json").write_text(json.dumps({"vocab_size": 512, "dim_model": 32, "num_layers": 1, "num_heads": 2,
                                                     "num_kv_heads": 2, "dim_ff": 64, "tie_lm_head": True}))
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"pretrain": {
        "config": "model.json", "tokenizer_path": str(tok), "dataset_config": "chat", "model_unique": "cli",
        "train_iters": 4, "batch_size": 2, "max_length": 96, "lr": "1e-3", "save_iters": 2, "n_gpus": 1,
        "save": str(tmp_path / "ckpt"), "lr_scheduler": "Cosine", "inspect_iters": 0}}))
    assert main(["train", "--config", str(cfg), "--set", "train_iters=3", "--set", "progress_bar=false"]) == 0
    out = capsys.readouterr().out
    assert "| Iter:      3 |" in out and "task_loss: | chat:" in out and "done: step 3" in out
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "ckpt" / "cli")] == [2, 3]
    assert main(["train", "--config", str(cfg), "--set", "resume_ckpt=latest", "--set", "train_iters=4",
                 "--set", "progress_bar=false"]) == 0
    assert "done: step 4" in capsys.readouterr().out
    assert main(["train", "--config", str(cfg), "--set", "lr_schedular=cosine"]) == 2
    assert "did you mean 'lr_scheduler'" in capsys.readouterr().err
    # fm9g inspect: an index folder, a train config, a model file, a run folder
    assert main(["inspect", str(tmp_path / "index")]) == 0
    assert '"nlines": 24' in capsys.readouterr().out
    assert main(["inspect", str(cfg)]) == 0
    assert '"lr_scheduler": "cosine"' in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "ckpt" / "cli" / "4" / "fm9g_live_checkpoint-4.pt")]) == 0
    assert "vocab 512, dim_model 32, layers 1, lm_head tied" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "ckpt" / "cli")]) == 0
    assert "3 checkpoints" in capsys.readouterr().out


def _toy_pipeline(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    from _toy import make_toy_tokenizer, write_sft_jsonl, write_text_jsonl

    from fm9g import build_index

    tok = make_toy_tokenizer(tmp_path / "tok")
    build_index(write_sft_jsonl(tmp_path / "chat.jsonl"), tmp_path / "idx_chat", language="en")
    build_index(write_text_jsonl(tmp_path / "text.jsonl"), tmp_path / "idx_text", language="en")
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps([
        {"dataset_name": "chat", "task_name": "chat", "path": "idx_chat", "abs_weight": 0.5, "transforms": "chatml"},
        {"dataset_name": "text", "task_name": "text", "path": "idx_text", "abs_weight": 0.5},
    ]))
    return tok, mix


def test_exact_resume_with_the_real_mixture_loader_in_a_new_process(tmp_path):
    tok, mix = _toy_pipeline(tmp_path)
    cfg = _cfg(tmp_path, model={"vocab_size": 512, "dim_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                "dim_ff": 64, "tie_lm_head": False}, tokenizer_path=str(tok), data=str(mix),
               batch_size=2, max_length=96, train_iters=6, save_iters=3, stats_dir="auto", model_unique="straight")
    straight = Trainer(cfg).fit()
    cfg_path = tmp_path / "cfg.json"
    cfg.to_json(cfg_path)
    # a new process continues from the straight run's step-3 checkpoint into another run folder
    out = subprocess.run([sys.executable, "-m", "fm9g", "train", "--config", str(cfg_path),
                          "--set", f"resume_ckpt={cfg.run_dir / '3'}", "--set", "model_unique=resumed"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from fm9g.training.metrics import read_train_stats

    resumed_rows = read_train_stats(cfg.run_dir.parent / "resumed")
    assert [r["iteration"] for r in resumed_rows] == [4, 5, 6]
    assert [r["loss"] for r in resumed_rows] == straight.losses[3:]
    a, b = _final_state(cfg.run_dir, 6), _final_state(cfg.run_dir.parent / "resumed", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_gpu_bf16_training_and_resume(tmp_path):
    """On CUDA: bf16 autocast with fp32 master weights, fused AdamW; loss falls; resume continues."""
    cfg = _cfg(tmp_path, train_iters=30, lr=1e-2, warmup_iters=0, lr_scheduler="constant", save_iters=15,
               device="cuda", model_unique="gpu")
    t = Trainer(cfg, loader=ToyLoader(fixed=True))
    assert t.engine.precision == "bf16" and next(t.model.parameters()).dtype == torch.float32
    assert t.engine.optimizer.defaults.get("fused") is True
    res = t.fit()
    assert res.losses[-1] < 0.5 * res.losses[0]
    again = Trainer(cfg.override({"resume_ckpt": "15"}), loader=ToyLoader(fixed=True)).fit()
    assert again.step == 30
    assert again.losses == pytest.approx(res.losses[15:], rel=2e-2)


@pytest.fixture
def restore_determinism():
    """Put back the process-wide deterministic-kernel settings a deterministic Trainer turns on."""
    import os

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
    if before[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[3]


@pytest.mark.parametrize("kw, words", [
    (dict(engine="bmtrain"), "engine=\"torch\""),
    (dict(attn_impl="flex"), "flex attention"),
    (dict(deterministic="yes"), "true/false"),
])
def test_deterministic_is_refused_where_kernels_are_not(tmp_path, kw, words):
    from fm9g._io import ConfigError

    with pytest.raises(ConfigError, match="deterministic") as exc:
        _cfg(tmp_path, deterministic=kw.pop("deterministic", True), **kw)
    assert words in str(exc.value)


def test_deterministic_turns_on_the_deterministic_kernels(tmp_path, restore_determinism):
    import os

    torch.use_deterministic_algorithms(False)
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    Trainer(_cfg(tmp_path, model_unique="plain"), loader=ToyLoader())
    assert not torch.are_deterministic_algorithms_enabled()  # off: nothing touched
    Trainer(_cfg(tmp_path, deterministic=True), loader=ToyLoader())
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark


@pytest.mark.gpu
def test_gpu_deterministic_runs_are_identical_and_resume_bit_exactly(tmp_path, restore_determinism):
    """deterministic=true on CUDA (bf16, compiled layers, the default attention): two runs give the
    same losses and weights bit for bit, and a resume at step 15 continues bit-exactly."""
    kw = dict(train_iters=30, lr=1e-2, warmup_iters=0, lr_scheduler="constant", save_iters=15, device="cuda",
              deterministic=True, max_length=64, save_final=True)
    ca, cb = _cfg(tmp_path / "a", **kw), _cfg(tmp_path / "b", **kw)
    a = Trainer(ca, loader=ToyLoader(fixed=True)).fit()
    b = Trainer(cb, loader=ToyLoader(fixed=True)).fit()
    assert a.losses == b.losses
    wa, wb = _final_state(ca.run_dir, 30), _final_state(cb.run_dir, 30)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    r = Trainer(cb.override({"resume_ckpt": "15"}), loader=ToyLoader(fixed=True)).fit()
    assert r.losses == a.losses[15:]
    wr = _final_state(cb.run_dir, 30)
    assert all(torch.equal(wa[k], wr[k]) for k in wa)


@pytest.mark.parametrize("example, expected", [
    ("pretrain.py", "resumed:"),  # it asserts its own exact resume
    ("sft.py", "->"),
    ("lora.py", "LoRA tensors saved"),
    ("quickstart.py", "A: "),  # SmolLM2-135M fine-tuned, then answering
])
def test_examples_cpu_smoke(example, expected):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--cpu-smoke"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in out.stdout, out.stdout[-2000:]


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    stats = tmp_path / "0.jsonl"
    stats.write_text(json.dumps({"iteration": 1, "loss": 2.0, "lr": 1e-4}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from fm9g.cli import main

    assert main(["plot", str(stats), "-o", str(tmp_path / "x.png")]) == 1
    assert "pip install 'fm9g[plot]'" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_engine_clips_like_clip_grad_norm(device):
    """The engine's clipping (foreach divide on CPU, folded into fused AdamW on CUDA) updates the
    weights exactly as torch's clip_grad_norm_ + AdamW would, over steps whose clip factors differ
    (Adam is invariant to one constant gradient scale, not to a changing one)."""
    import copy

    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.training.torch_engine import TorchEngine

    torch.manual_seed(0)
    model = FM9GModel(FM9GConfig.from_name("tiny", scale=False, scale_depth=-1.0, attn_impl="sdpa"))
    reference, unclipped = copy.deepcopy(model).to(device), copy.deepcopy(model).to(device)
    engine = TorchEngine(model, lr=1e-2, clip_grad=0.05, device=device, precision="fp32")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
            for m in (reference, unclipped)]
    for step in range(3):
        ids = torch.randint(0, 99, (2, 8 + 8 * step))
        out = engine.train_step([{"input_ids": ids, "labels": ids}], lr=1e-2)
        assert out.grad_norm > 0.05  # the clip is active
        for m, opt, clip in ((reference, opts[0], 0.05), (unclipped, opts[1], None)):
            m(ids.to(device), labels=ids.to(device)).loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), clip or float("inf"))
            opt.step()
            opt.zero_grad()
            if clip:
                assert out.grad_norm == pytest.approx(float(norm), rel=1e-4)
    for (name, p), q, u in zip(model.named_parameters(), reference.parameters(), unclipped.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert max((p - u).abs().max().item() for p, u in zip(model.parameters(), unclipped.parameters())) > 1e-3


# ------------------------------------------------------------------ issue 15: checkpoints and resume
def _steps(run_dir):
    return [s for s, _ in ck.list_checkpoints(run_dir)]


def test_rollback_with_keep_last_keeps_the_new_branch_and_latest_follows_it(tmp_path):
    cfg = _cfg(tmp_path, train_iters=4, save_iters=2)
    Trainer(cfg, loader=ToyLoader()).fit()                                   # checkpoints 2 and 4
    back = cfg.override({"resume_ckpt": "2", "keep_last": 1, "train_iters": 3})
    assert Trainer(back, loader=ToyLoader()).fit().last_checkpoint == cfg.run_dir / "3"
    assert _steps(cfg.run_dir) == [2, 3]            # just written + resumed from; never the new branch
    assert ck.resolve_checkpoint(cfg.run_dir, "latest") == cfg.run_dir / "3"
    aside = list((cfg.run_dir / "abandoned").iterdir())   # the abandoned 4: moved, not deleted
    assert len(aside) == 1 and aside[0].name.startswith("4-") and (aside[0] / "fm9g_live_checkpoint-4.pt").is_file()
    # the next resume (from latest = 3) prunes the old lineage normally
    t = Trainer(cfg.override({"resume_ckpt": "latest", "keep_last": 2, "train_iters": 5, "save_iters": 0}),
                loader=ToyLoader())
    assert t.fit().step == 5 and _steps(cfg.run_dir) == [3, 5]


@pytest.mark.parametrize("key, value", [("lr", "inf"), ("lr", 1e400), ("weight_decay", "nan"), ("clip_grad", "inf"),
                                        ("adam_eps", "-inf"), ("warmup_iters", "inf"), ("drop_rate", "nan"),
                                        ("adam_betas", [0.9, "nan"]), ("peak_flops", "inf"), ("train_iters", "inf")])
def test_non_finite_hyperparameters_are_config_errors(tmp_path, key, value):
    from fm9g._io import ConfigError

    with pytest.raises(ConfigError, match=rf"{key} must be (a finite number|an integer)"):
        _cfg(tmp_path, **{key: value})


def test_non_finite_weights_are_never_saved_and_nothing_is_pruned(tmp_path):
    cfg = _cfg(tmp_path, train_iters=2, save_iters=1, keep_last=1)
    Trainer(cfg, loader=ToyLoader()).fit()
    assert _steps(cfg.run_dir) == [2]
    wild = cfg.override({"lr": 1e39, "resume_ckpt": "latest", "train_iters": 4})  # a finite float, but the fp32 update overflows
    with pytest.raises(TrainingError, match=r"not saving checkpoint 3: the model weights hold inf or NaN.*"
                                            r"Lower lr.*resume_ckpt=2"):
        Trainer(wild, loader=ToyLoader()).fit()
    assert _steps(cfg.run_dir) == [2] and not (cfg.run_dir / "abandoned").exists()
    assert all(torch.isfinite(v).all() for v in _final_state(cfg.run_dir, 2).values())


def test_a_checkpoint_without_optimizer_or_loader_state_is_refused_unless_asked(tmp_path, capsys):
    cfg = _cfg(tmp_path, train_iters=2, save_iters=2)
    Trainer(cfg, loader=ToyLoader()).fit()
    two = cfg.run_dir / "2"
    (two / "fm9g_live_checkpoint-2.rank-0.opt").unlink()
    again = cfg.override({"resume_ckpt": "2", "train_iters": 3})
    with pytest.raises(ck.CheckpointError, match=r"holds no optimizer state.*set resume_no_optimizer=true"):
        Trainer(again, loader=ToyLoader()).fit()
    capsys.readouterr()
    t = Trainer(again.override({"resume_no_optimze": "true"}), loader=ToyLoader())   # the original's spelling
    assert t.config.resume_no_optimizer is True and t.fit().step == 3
    out = capsys.readouterr().out
    assert "restored weights, data position, step 2 and token counters, RNG; NOT restored: optimizer" in out
    (two / "dataset_ckpt" / "loader_state.pt").unlink()
    no_opt = again.override({"resume_no_optimizer": True})
    with pytest.raises(ck.CheckpointError, match=r"holds no data loader state.*load_dataloader_ckpt=false"):
        Trainer(no_opt, loader=ToyLoader()).fit()
    with pytest.raises(ck.CheckpointError, match=r"loader \(_ListLoader\) has no load_state_dict"):
        Trainer(cfg.override({"resume_ckpt": "latest"}), loader=_ListLoader([2, 3])).resume("latest")
    capsys.readouterr()
    assert Trainer(no_opt.override({"load_dataloader_ckpt": False}), loader=ToyLoader()).fit().step == 3
    assert "NOT restored: optimizer (resume_no_optimizer" in capsys.readouterr().out
    # a complete checkpoint: the header says the resume is exact
    Trainer(cfg.override({"resume_ckpt": "latest", "train_iters": 4}), loader=ToyLoader()).fit()
    assert "restored weights, optimizer, data position, step 3 and token counters, RNG; exact resume" in capsys.readouterr().out


def test_lora_resume_with_other_settings_or_another_base_is_refused(tmp_path):
    import shutil

    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel

    for name, seed in (("base.pt", 123), ("other.pt", 5)):
        torch.manual_seed(seed)
        torch.save(FM9GModel(FM9GConfig.from_name("tiny")).state_dict(), tmp_path / name)
    cfg = _cfg(tmp_path, train_iters=2, save_iters=2, pretrained_model=str(tmp_path / "base.pt"),
               lora={"r": 4, "alpha": 8, "target_modules": ["project_q", "project_v"]})
    Trainer(cfg, loader=ToyLoader()).fit()
    resume = cfg.override({"resume_ckpt": "2", "train_iters": 3})
    with pytest.raises(ck.CheckpointError, match=r"other LoRA settings \(alpha: 8 in the checkpoint vs 16"):
        Trainer(resume.override({"lora_alpha": 16}), loader=ToyLoader()).fit()
    with pytest.raises(ck.CheckpointError, match=r"target_modules"):
        Trainer(resume.override({"lora_layer": ["project_q"]}), loader=ToyLoader()).fit()
    with pytest.raises(ck.CheckpointError, match=r"trained on another base model.*other\.pt"):
        Trainer(resume.override({"pretrained_model": str(tmp_path / "other.pt")}), loader=ToyLoader()).fit()
    shutil.copy(tmp_path / "base.pt", tmp_path / "moved.pt")    # the same base elsewhere is fine
    assert Trainer(resume.override({"pretrained_model": str(tmp_path / "moved.pt")}), loader=ToyLoader()).fit().step == 3


def test_relative_save_paths_resolve_against_the_config_file_folder(tmp_path, monkeypatch):
    conf, work = tmp_path / "conf", tmp_path / "work"
    conf.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    (conf / "train.json").write_text(json.dumps({"model": "tiny", "save": "ckpts", "model_unique": "r",
                                                 "tensorboard": "tb", "stats_dir": "stats"}))
    cfg = TrainConfig.from_json(conf / "train.json")
    want = conf.resolve() / "ckpts" / "r"
    assert cfg.run_dir == want                        # before the folder exists ...
    (want / "2").mkdir(parents=True)
    assert cfg.run_dir == want                        # ... and after: one place
    assert Path(cfg.output_path(cfg.tensorboard)) == conf.resolve() / "tb"
    assert TrainConfig(model="tiny", save="ckpts").run_dir == Path("ckpts") / "fm9g"   # Python: the cwd


def _tiny_lora_model(seed=0):
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.models.lora import LoraConfig, apply_lora

    torch.manual_seed(seed)
    model = FM9GModel(FM9GConfig.from_name("tiny", attn_impl="sdpa"))
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["project_q", "project_v", "w_out"]))
    for name, p in model.named_parameters():  # B = 0 at init: give the LoRA path a non-zero output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _lora_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 16), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def test_lora_base_is_bf16_under_bf16_precision_and_trains_like_fp32():
    """Under bf16 precision the frozen base is held in bf16 (no per-step casts of it) and only the
    LoRA tensors are fp32; on CPU's default precision (fp32) nothing changes."""
    eng16 = TorchEngine(_tiny_lora_model(), device="cpu", precision="bf16", lora_only=True, lr=1e-2)
    eng32 = TorchEngine(_tiny_lora_model(), device="cpu", precision="auto", lora_only=True, lr=1e-2)
    assert eng32.precision == "fp32"
    for name, p in eng16.model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
        assert p.requires_grad == ("lora_" in name), name
    assert all(p.dtype == torch.float32 for p in eng32.model.parameters())
    for p in eng16.params:
        assert p.dtype == torch.float32
    losses16, losses32 = [], []
    for step in range(4):
        o16 = eng16.train_step([_lora_batch()], 1e-2)
        o32 = eng32.train_step([_lora_batch()], 1e-2)
        assert o16.skipped is None and o32.skipped is None
        losses16.append(o16.loss)
        losses32.append(o32.loss)
    assert losses16 == pytest.approx(losses32, rel=3e-2)  # bf16 compute vs fp32
    assert losses16[-1] < losses16[0] and losses32[-1] < losses32[0]
    sd = eng16.model_state_dict(lora_only=True)
    assert sd and all(v.dtype == torch.float32 for v in sd.values())


def test_step_figures_are_deferred_and_read_once():
    """train_step hands back device figures; they are read (one copy) on first use, and a
    non-finite step is skipped inside the optimizer: weights, moments and step counts unchanged."""
    eng = TorchEngine(_PoisonModel(), device="cpu", lr=1e-1)
    ok = eng.train_step([{"input_ids": torch.tensor([[2, 3, 4, 5]]), "labels": torch.tensor([[2, 3, 4, 5]])}], 1e-1)
    assert not ok.ready
    assert ok.skipped is None and ok.ready and ok.num_label_tokens == 4 and ok.num_tokens == 4
    assert ok.grad_norm is not None and ok.grad_norm > 0
    w = eng.model.emb.weight.detach().clone()
    state = {k: v.clone() for k, v in eng.optimizer.state[eng.model.emb.weight].items()}
    bad = eng.train_step([{"input_ids": torch.tensor([[0, 3, 4, 5]]), "labels": torch.tensor([[0, 3, 4, 5]])}], 1e-1)
    assert bad.skipped == "nonfinite" and bad.grad_norm is None
    assert torch.equal(w, eng.model.emb.weight)
    for k, v in eng.optimizer.state[eng.model.emb.weight].items():
        assert torch.equal(v, state[k]), k


def _poison_call(model, bad_calls):
    """Make the forward calls numbered in ``bad_calls`` (1-based) return a NaN loss."""
    calls = {"n": 0}

    def hook(module, args, out):
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out.token_loss = out.token_loss * float("nan")
        return out

    model.register_forward_hook(hook)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_master"])
def test_launch_ahead_trains_exactly_as_waiting_for_each_step(tmp_path, optimizer):
    """Queueing the next step before this one's figures are read (CUDA runs do) changes nothing:
    the same losses, skips and final weights, also when the step it was queued behind is skipped
    (its learning rate is then the skipped iteration's, picked on the device), around checkpoints."""
    results = []
    for ahead in (False, True):
        cfg = _cfg(tmp_path / f"ahead{ahead}", train_iters=9, save_iters=4, warmup_iters=3, optimizer=optimizer)
        t = Trainer(cfg, loader=ToyLoader())
        _poison_call(t.model, {3, 7})
        t.engine._device_lr, t.engine.launch_ahead = True, ahead  # CPU runs wait by default
        queued = []
        inner = t.engine.train_step

        def train_step(batches, lr, **kw):
            queued.append(kw.get("after") is not None)
            return inner(batches, lr, **kw)

        t.engine.train_step = train_step
        res = t.fit()
        results.append((res, queued, {k: v.clone() for k, v in t.engine.model_state_dict().items()}, cfg.run_dir))
    (wait, q_wait, w_wait, dir_wait), (go, q_go, w_go, dir_go) = results
    assert not any(q_wait) and sum(q_go) >= 4, (q_wait, q_go)
    assert go.losses == wait.losses and go.skipped == wait.skipped == {"nonfinite": 2, "oom": 0}
    assert go.step == wait.step == 9
    assert all(torch.equal(w_go[k], w_wait[k]) for k in w_wait)
    for step in (4, 8):  # nothing was queued across a checkpoint: both hold the same weights
        a, b = _final_state(dir_wait, step), _final_state(dir_go, step)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_master"])
def test_gpu_launch_ahead_is_on_and_exact(tmp_path, optimizer):
    """On CUDA the Trainer queues each step behind the one before by default; the losses, skips
    and weights are bit-identical to waiting for every step."""
    results = []
    for ahead in (True, False):
        cfg = _cfg(tmp_path / f"ahead{ahead}", train_iters=9, save_iters=4, warmup_iters=3, optimizer=optimizer,
                   device="cuda", compile=False)
        t = Trainer(cfg, loader=ToyLoader())
        _poison_call(t.model, {3, 7})
        assert t.engine.launch_ahead
        t.engine.launch_ahead = ahead
        res = t.fit()
        results.append((res, {k: v.clone() for k, v in t.engine.model_state_dict().items()}))
    (go, w_go), (wait, w_wait) = results
    assert go.losses == wait.losses and go.skipped == wait.skipped == {"nonfinite": 2, "oom": 0}
    assert all(torch.equal(w_go[k], w_wait[k]) for k in w_wait)


def test_train_step_puts_a_model_in_eval_mode_back_into_training():
    """train_step walks the modules only when the model is not training (host time per step), but a
    model left in eval mode (e.g. after generating) trains with dropout on again."""
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel

    torch.manual_seed(0)
    engine = TorchEngine(FM9GModel(FM9GConfig.from_name("tiny")), lr=1e-3, device="cpu")
    ids = torch.randint(0, 99, (1, 8), generator=torch.Generator().manual_seed(0))
    engine.model.eval()
    engine.train_step([{"input_ids": ids, "labels": ids}], lr=1e-3)
    assert all(m.training for m in engine.model.modules())


def test_train_stats_roll_over_to_numbered_files_and_read_back_whole(tmp_path):
    """The train_stats file stays open between steps and rolls to <n+1>.jsonl once it passes
    roll_bytes; a later logger continues after the last full file; every row reads back."""
    from fm9g.training import metrics

    stats = tmp_path / "train_stats"
    for start in (0, 10):  # a second logger (a resumed run) appends after the first one's files
        log = metrics.MetricsLogger(total_steps=20, start_step=start, stats_dir=stats, progress_bar=False,
                                    stream=io.StringIO(), roll_bytes=200)
        for step in range(start + 1, start + 11):
            log.log(step, {"loss": 1.0 / step, "lr": 1e-3})
            assert [r["iteration"] for r in metrics.read_train_stats(stats)] == list(range(1, step + 1))
        log.close()
    files = sorted(int(p.stem) for p in stats.glob("*.jsonl"))
    assert files == list(range(len(files))) and len(files) > 3
    assert all(p.stat().st_size <= 200 + 200 for p in stats.glob("*.jsonl"))  # at most one row past the limit


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer, lora", [("adamw", False), ("adamw_master", False), ("adamw", True)])
def test_gpu_cuda_graphs_train_like_plain_compiled_layers(tmp_path, optimizer, lora):
    """cuda_graphs=True: the compiled layers replay as recorded CUDA graphs (none skipped) over packing
    layouts that change every step; losses and weights follow the same run without graphs (full
    and LoRA); forwards without grad (generation) record no graphs and give the same logits; a run
    through fit() resumes from its checkpoint."""
    import copy
    import random

    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.models.lora import LoraConfig, apply_lora

    torch.manual_seed(0)
    base = FM9GModel(FM9GConfig.from_name("tiny", num_layers=2))
    if lora:
        apply_lora(base, LoraConfig(r=8, alpha=16, target_modules=["project_q", "project_v", "w_0", "w_out"]))
        for name, p in base.named_parameters():  # B starts at zero: make the adapters matter from step 1
            if "lora_B" in name:
                p.data.normal_(0.0, 0.02)
    runs = []
    for graphs in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = copy.deepcopy(base)
        engine = TorchEngine(model, lr=1e-3, device="cuda", compile=True, cuda_graphs=graphs, optimizer=optimizer,
                             lora_only=lora)
        assert engine.cuda_graphs is graphs and model.graphed_layers is graphs
        rng, gen = random.Random(0), torch.Generator().manual_seed(0)
        losses = []
        for step in range(10):
            micro = []
            for _ in range(2 if step % 3 == 2 else 1):  # some steps accumulate two micro-batches
                bounds = [0, *sorted(rng.sample(range(1, 256), rng.randint(1, 6))), 256]
                ids = torch.randint(3, 99, (1, 256), generator=gen)
                micro.append({"input_ids": ids, "labels": torch.roll(ids, -1, 1),
                              "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
                              "max_seqlen": max(b - a for a, b in zip(bounds, bounds[1:]))})
            losses.append(engine.train_step(micro, lr=1e-3).loss)
        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        recorded = next(manager.graph_counter) if manager is not None else 0
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # generation-like: growing lengths
            logits = [model(ids[:, :n].cuda()).logits.float() for n in (5, 6, 7, 40)]
        if graphs:
            assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
            assert recorded >= 4  # forward + backward of 2 layers
            assert next(manager.graph_counter) == recorded + 1  # nothing recorded without grad
        runs.append((losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()}, logits))
    (plain, w_plain, l_plain), (graphed, w_graphed, l_graphed) = runs
    assert graphed == pytest.approx(plain, rel=1e-3)
    for k in w_plain:  # attention's dq adds blocks with atomics: the last bf16 bit may differ
        torch.testing.assert_close(w_graphed[k], w_plain[k], rtol=1e-2, atol=1e-3, msg=k)
    for a, b in zip(l_plain, l_graphed):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
    if lora:
        return
    cfg = _cfg(tmp_path, train_iters=12, save_iters=6, device="cuda", cuda_graphs=True, optimizer=optimizer,
               model_unique="graphs")
    res = Trainer(cfg, loader=ToyLoader()).fit()
    again = Trainer(cfg.override({"resume_ckpt": "6"}), loader=ToyLoader()).fit()
    assert again.step == 12 and res.step == 12
    assert again.losses == pytest.approx(res.losses[6:], rel=2e-2)


def test_cuda_graphs_settings_are_checked():
    """cuda_graphs takes true / false / "auto"; asked for where it cannot work, the error says what
    to change; "auto" is off on the CPU."""
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.training.config import ConfigError

    with pytest.raises(ConfigError, match="cuda_graphs must be true, false or \"auto\""):
        TrainConfig(model="tiny", cuda_graphs="yes")
    model = FM9GModel(FM9GConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="needs a CUDA device.*cuda_graphs=false"):
        TorchEngine(model, device="cpu", cuda_graphs=True)
    engine = TorchEngine(model, device="cpu", cuda_graphs="auto")
    assert engine.cuda_graphs is False and model.graphed_layers is False
