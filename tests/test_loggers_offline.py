"""The optional loggers in each library's own offline / local-file mode, through a real run.

Each test is skipped (saying which package) where its library is not installed; the CPU CI
environment installs none of them (they are never required). Run with an environment that has
``wandb``, ``mlflow`` (or ``mlflow-skinny``) and ``swanlab`` to exercise them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm9g.data.indexed import build_index
from fm9g.training.config import TrainConfig
from fm9g.training.trainer import Trainer


def _run(tmp_path: Path, callback) -> Trainer:
    tokens = ["<unk>", "<s>", "</s>"] + list("abcdefghij ")
    (tmp_path / "vocab.txt").write_text("".join(json.dumps(t) + "\n" for t in tokens))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"input": "", "output": "abc def " * (1 + i % 3)}) + "\n"
                                              for i in range(20)))
    build_index(tmp_path / "d.jsonl", tmp_path / "index", language="en")
    cfg = TrainConfig(model="tiny", tokenizer_path=str(tmp_path / "vocab.txt"), train_iters=2, lr=1e-3, max_length=32,
                      data=[{"dataset_name": "d", "task_name": "d", "path": str(tmp_path / "index"), "abs_weight": 1}],
                      batch_size=2, save=str(tmp_path / "ck"), save_iters=0, progress_bar=False, inspect_iters=0,
                      tensorboard=None, stats_dir=None, eval_split=0.2, eval_iters=1)
    t = Trainer(cfg, callbacks=[callback])
    t.fit()
    return t


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    from fm9g.training.callbacks import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path, WandbLogger(mode="offline", dir=str(tmp_path), project="fm9g-test"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_mlflow_local_files(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow)")
    from fm9g.training.callbacks import MLflowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    uri = f"file:{tmp_path / 'mlruns'}"
    t = _run(tmp_path, MLflowLogger(tracking_uri=uri, experiment="fm9g-test", run_name="tiny"))
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("fm9g-test").experiment_id])[0]
    evals = [m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")]
    assert evals == pytest.approx([e.loss for e in t.evaluator.history])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2


def test_swanlab_local(tmp_path):
    pytest.importorskip("swanlab", reason="swanlab is not installed (pip install swanlab)")
    from fm9g.training.callbacks import SwanLabLogger

    _run(tmp_path, SwanLabLogger(mode="local", logdir=str(tmp_path / "swanlog"), project="fm9g-test"))
    assert any((tmp_path / "swanlog").rglob("*"))
