"""Evaluation under torchrun (2 CPU ranks, gloo, FSDP2): each rank scores its shard of the held-out
documents and the per-task sums are reduced, so the logged eval loss and token count equal one
process scoring every held-out document with the same weights."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = "sea ship island dawn tower canal harbour kelp bread stone oven temple trident king blue silver".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_report_the_eval_loss_of_all_held_out_documents(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    from _toy import make_toy_tokenizer

    from fm9g import build_index
    from fm9g.data.tokenizers import load_tokenizer
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.training.config import TrainConfig
    from fm9g.training.evaluate import Evaluator, build_eval_loaders
    from fm9g.training.metrics import read_train_stats

    tok_dir = make_toy_tokenizer(tmp_path / "tok")
    lines = [json.dumps({"input": "", "output": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(8 + i % 6))})
             for i in range(40)]
    (tmp_path / "text.jsonl").write_text("\n".join(lines) + "\n")
    build_index(tmp_path / "text.jsonl", tmp_path / "index", language="en")
    model = {"vocab_size": 512, "dim_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "dim_head": 16,
             "dim_ff": 64, "tie_lm_head": False}
    cfg = {"model": model, "tokenizer_path": str(tok_dir), "train_iters": 2, "lr": 3e-3, "max_length": 48,
           "data": [{"dataset_name": "text", "task_name": "text", "path": str(tmp_path / "index"), "abs_weight": 1}],
           "batch_size": 1, "save": str(tmp_path / "runs"), "model_unique": "two", "save_iters": 0, "progress_bar": False,
           "inspect_iters": 0, "tensorboard": None, "stats_dir": "auto", "seed": 3, "device": "cpu", "compile": False,
           "eval_split": 0.25, "eval_iters": 1}
    (tmp_path / "two.json").write_text(json.dumps(cfg))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                          f"--master_port={_free_port()}", "-m", "fm9g", "train", "--config", str(tmp_path / "two.json")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = {r["iteration"]: r for r in read_train_stats(tmp_path / "runs" / "two")}
    assert rows[1]["eval_loss"] > 0 and rows[2]["eval_loss"] > 0

    config = TrainConfig.from_dict(cfg)
    one = FM9GModel(FM9GConfig.from_dict(model)).eval()
    one.load_state_dict(torch.load(tmp_path / "runs" / "two" / "2" / "fm9g_live_checkpoint-2.pt", weights_only=True))
    tok = load_tokenizer(tok_dir)
    ev = Evaluator(config, lambda: build_eval_loaders(config, tok, rank=0, world_size=1))
    r = ev.evaluate(one, 2, device=torch.device("cpu"))
    assert rows[2]["eval_tokens"] == r.tokens == r.task_tokens["text"]
    assert rows[2]["eval_loss"] == pytest.approx(r.loss, rel=1e-5)
    assert rows[2]["eval_loss/text"] == pytest.approx(r.task_loss["text"], rel=1e-5)
