"""Evaluation while training (issue 28): held-out documents, the eval loss against a direct
computation, training unchanged by evaluation, exact resume of evals and `best`, keep_best with
keep_last 1, early stopping at the hand-computed step, callbacks and loggers."""
from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from fm9g.data.indexed import IndexedDataset, build_index
from fm9g.data.mixture import MixtureLoader
from fm9g.data.split import held_out_lines, split_lines
from fm9g.data.tokenize import SampleTokenizer
from fm9g.data.tokenizers import VocabTxtTokenizer
from fm9g.training import checkpoint as ck
from fm9g.training.callbacks import Callback, JsonlLogger, MLflowLogger, SwanLabLogger, TensorBoardLogger, WandbLogger
from fm9g.training.config import TrainConfig
from fm9g.training.evaluate import EvalResult
from fm9g.training.metrics import read_train_stats
from fm9g.training.trainer import Trainer

CHARS = "abcdefghijklmnopqrstuvwxyz "


def _vocab(root: Path) -> Path:
    tokens = ["<unk>", "<s>", "</s>"] + list(CHARS)  # 30 ids < the tiny preset's 99
    (root / "vocab.txt").write_text("".join(json.dumps(t) + "\n" for t in tokens))
    return root / "vocab.txt"


def _dataset(root: Path, name: str, n: int, seed: int) -> Path:
    r = random.Random(seed)
    raw = root / f"{name}.jsonl"
    with open(raw, "w") as f:
        for i in range(n):
            words = " ".join("".join(r.choice("abcde" if name == "alpha" else "vwxyz") for _ in range(r.randint(2, 5)))
                             for _ in range(r.randint(2, 6)))
            f.write(json.dumps({"input": f"q {i % 7}", "output": words}) + "\n")
    build_index(raw, root / "index" / name, language="en", overwrite=True)
    return root / "index" / name


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaldata")
    paths = {"alpha": _dataset(root, "alpha", 40, 1), "beta": _dataset(root, "beta", 30, 2),
             "gamma": _dataset(root, "gamma", 12, 3)}
    entries = [{"dataset_name": t, "task_name": t, "path": str(paths[t]), "abs_weight": w, "allow_repeat": True}
               for t, w in (("alpha", 0.6), ("beta", 0.4))]
    test = [{"dataset_name": "gamma", "task_name": "gamma", "path": str(paths["gamma"]), "abs_weight": 1.0}]
    return {"root": root, "vocab": _vocab(root), "paths": paths, "entries": entries, "test": test}


def _cfg(tmp_path, d, **kw) -> TrainConfig:
    base = dict(model="tiny", tokenizer_path=str(d["vocab"]), data=d["entries"], train_iters=8, lr=3e-3,
                warmup_iters=0, lr_scheduler="constant", save=str(tmp_path / "ckpt"), save_iters=0, max_length=32,
                batch_size=2, progress_bar=False, inspect_iters=0, seed=11, tensorboard=None, stats_dir=None,
                eval_split=0.2)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------ which documents are held out
def test_held_out_lines_are_fixed_nested_and_seed_free():
    a = held_out_lines(1000, 0.1, "alpha")
    assert len(a) == 100 and a.tolist() == sorted(set(a.tolist()))
    assert a.tolist() == held_out_lines(1000, 0.1, "alpha").tolist()  # no state, no seed
    assert set(a.tolist()) < set(held_out_lines(1000, 0.2, "alpha").tolist())  # a larger share holds out a superset
    assert a.tolist() != held_out_lines(1000, 0.1, "beta").tolist()  # keyed by the task
    assert len(held_out_lines(3, 0.01, "x")) == 1 and len(held_out_lines(3, 0.99, "x")) == 2  # >= 1 out, >= 1 in
    assert split_lines(10, 0.0, "x", "train") is None
    train, held = split_lines(50, 0.3, "x", "train"), split_lines(50, 0.3, "x", "eval")
    assert sorted(train.tolist() + held.tolist()) == list(range(50))
    with pytest.raises(ValueError, match="eval_split"):
        held_out_lines(10, 1.0, "x")


@pytest.mark.parametrize("world_size", [1, 2])
def test_eval_split_documents_never_appear_in_a_training_batch(data, world_size):
    """Through the real loader, over a whole epoch of every rank: the training side reads every
    other document exactly once and never a held-out one; the eval side reads exactly the held-out ones."""
    tok = VocabTxtTokenizer(data["vocab"])
    entries = [dict(e, allow_repeat=False) for e in data["entries"]]
    seen: dict[str, list[tuple[int, int]]] = {"train": [], "eval": []}
    for split in ("train", "eval"):
        for rank in range(world_size):
            loader = MixtureLoader(entries, tok, 32, 2, seed=5, rank=rank, world_size=world_size, holdout=0.2, split=split)
            for batch in loader:
                starts = batch["sample_lines"].tolist()
                seen[split] += sorted(set(map(tuple, starts)))  # a long document's windows repeat its line
    for d, task in enumerate(("alpha", "beta")):
        n = len(IndexedDataset(data["paths"][task]))
        held = set(held_out_lines(n, 0.2, task).tolist())
        trained = [line for t, line in seen["train"] if t == d]
        assert not held & set(trained), f"{task}: held-out documents were trained on"
        assert sorted(trained) == sorted(set(range(n)) - held)  # each other document once
        assert sorted(line for t, line in seen["eval"] if t == d) == sorted(held)


# ------------------------------------------------------------------ the measured loss
def _direct_loss(model, tok, path: Path, lines, max_length: int) -> tuple[float, int]:
    """Sum of per-token losses and labelled tokens over documents, each run alone (no packing)."""
    enc = SampleTokenizer(tok, max_length)
    ds = IndexedDataset(path)
    total, count = 0.0, 0
    with torch.no_grad():
        for line in lines:
            rec = ds[int(line)]
            for w in enc({"input": rec.get("input", ""), "output": rec["output"]}):
                labels = torch.tensor([w.labels])
                out = model(torch.tensor([w.input_ids]), labels=labels)
                total += float(out.token_loss.double().sum())
                count += int((labels != -100).sum())
    return total, count


def test_eval_loss_equals_a_direct_computation_overall_and_per_task(tmp_path, data):
    cfg = _cfg(tmp_path, data, eval_iters=4, eval_data=data["test"], train_iters=4)
    t = Trainer(cfg)
    t.fit()
    result = t.evaluator.history[-1]
    assert result.step == 4 and set(result.task_loss) == {"alpha", "beta", "gamma"}
    tok, model = t.tokenizer, t.model.eval()
    sums, counts = {}, {}
    for task in ("alpha", "beta"):
        n = len(IndexedDataset(data["paths"][task]))
        sums[task], counts[task] = _direct_loss(model, tok, data["paths"][task], held_out_lines(n, 0.2, task), 32)
    sums["gamma"], counts["gamma"] = _direct_loss(model, tok, data["paths"]["gamma"], range(12), 32)
    for task in sums:
        assert result.task_tokens[task] == counts[task]
        assert result.task_loss[task] == pytest.approx(sums[task] / counts[task], rel=1e-5)
    overall = sum(sums.values()) / sum(counts.values())
    assert result.loss == pytest.approx(overall, rel=1e-5) and result.tokens == sum(counts.values())
    assert result.perplexity == pytest.approx(torch.tensor(overall).exp().item(), rel=1e-5)
    # eval_tokens bounds the rows scored
    small = Trainer(_cfg(tmp_path, data, eval_iters=1, eval_tokens=64, train_iters=1, model_unique="small"))
    assert sum(int(b["input_ids"].numel()) for _, rows in small.evaluator.sets() for b in rows) == 64


# ------------------------------------------------------------------ evaluation changes nothing
def test_training_is_bit_identical_with_evaluation_on(tmp_path, data):
    off = Trainer(_cfg(tmp_path, data, model_unique="off"))
    r_off = off.fit()
    on = Trainer(_cfg(tmp_path, data, model_unique="on", eval_iters=2, eval_data=data["test"], eval_prompts=["q 3"]))
    r_on = on.fit()
    assert r_on.losses == r_off.losses  # exactly
    a, b = off.model.state_dict(), on.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e.step for e in on.evaluator.history] == [2, 4, 6, 8]
    assert all("q 3" in e.answers for e in on.evaluator.history)


def test_resume_reports_the_same_evals_and_keeps_the_same_best(tmp_path, data):
    kw = dict(eval_iters=2, save_iters=2, keep_best=True, train_iters=8)
    full = Trainer(_cfg(tmp_path, data, model_unique="full", **kw))
    full.fit()
    part = Trainer(_cfg(tmp_path, data, model_unique="part", **dict(kw, train_iters=4)))
    part.fit()
    resumed = Trainer(_cfg(tmp_path, data, model_unique="part", resume_ckpt="latest", **kw))
    resumed.fit()
    assert [e.to_dict() for e in resumed.evaluator.history] == [e.to_dict() for e in full.evaluator.history]
    assert resumed.evaluator.best_step == full.evaluator.best_step
    best = ck.best_checkpoint(resumed.config.run_dir)
    assert best is not None and best.name == str(full.evaluator.best_step)


# ------------------------------------------------------------------ best checkpoint, early stopping
def _expected_stop(losses: list[tuple[int, float]], patience: int, min_delta: float) -> int | None:
    """The step early stopping must stop at, computed by hand from an eval-loss sequence."""
    best, bad = float("inf"), 0
    for step, loss in losses:
        bad = 0 if loss < best - min_delta else bad + 1  # an improvement must beat the best by min_delta
        best = min(best, loss)
        if bad >= patience:
            return step
    return None


def test_keep_best_survives_keep_last_1_and_early_stopping_stops_where_predicted(tmp_path, data):
    # one dataset, made to overfit: a high learning rate on 16 short documents, scored on 4 held out
    small = [dict(data["entries"][1], abs_weight=1.0)]
    kw = dict(data=small, eval_split=0.2, eval_iters=2, lr=2e-2, train_iters=30, max_length=24)
    reference = Trainer(_cfg(tmp_path, data, model_unique="ref", **kw))
    reference.fit()
    seq = [(e.step, e.loss) for e in reference.evaluator.history]
    stop = _expected_stop(seq, patience=2, min_delta=0.01)
    assert stop is not None and stop < 30, f"the run did not overfit: {seq}"
    best_step = min(seq[: [s for s, _ in seq].index(stop) + 1], key=lambda x: x[1])[0]

    t = Trainer(_cfg(tmp_path, data, model_unique="es", keep_best=True, keep_last=1, save_iters=2,
                     early_stopping_patience=2, early_stopping_min_delta=0.01, **kw))
    res = t.fit()
    assert res.step == stop and res.stop_reason == "early_stopping"
    steps = [s for s, _ in ck.list_checkpoints(t.config.run_dir)]
    assert steps == sorted({best_step, stop}), steps  # keep_last 1 kept the best besides the last
    best = ck.resolve_checkpoint(t.config.run_dir, "best")
    assert best.name == str(best_step)
    # the best checkpoint loads, and scores the recorded best loss
    again = Trainer(_cfg(tmp_path, data, model_unique="es", resume_ckpt="best", only_load_model=True,
                         **dict(kw, eval_iters=2)))
    again.resume("best")
    r = again.evaluator.evaluate(again.model, best_step, device=torch.device("cpu"))
    assert r.loss == pytest.approx(dict(seq)[best_step], rel=1e-6)


# ------------------------------------------------------------------ callbacks and loggers
class Recorder(Callback):
    def __init__(self, stop_at: int | None = None):
        self.events, self.stop_at = [], stop_at

    def on_step_end(self, trainer, step, metrics, task_loss):
        self.events.append(("step", step, round(metrics["loss"], 6)))
        if step == self.stop_at:
            trainer.request_stop(f"asked at {step}")

    def on_eval(self, trainer, result):
        self.events.append(("eval", result.step))

    def on_save(self, trainer, path):
        self.events.append(("save", int(Path(path).name)))

    def on_fit_end(self, trainer, result):
        self.events.append(("end", result.step, result.stop_reason))


def test_callbacks_see_every_event_and_can_stop(tmp_path, data):
    rec = Recorder()
    t = Trainer(_cfg(tmp_path, data, eval_iters=3, save_iters=4, stats_dir="auto"), callbacks=[rec])
    res = t.fit()
    kinds = [e[0] for e in rec.events]
    assert kinds.count("step") == 8 and [e[1] for e in rec.events if e[0] == "eval"] == [3, 6, 8]
    assert [e[1] for e in rec.events if e[0] == "save"] == [4, 8] and rec.events[-1] == ("end", 8, "train_iters")
    assert [e[2] for e in rec.events if e[0] == "step"] == [round(x, 6) for x in res.losses]
    rows = read_train_stats(t.config.run_dir)
    evals = {r["iteration"]: r for r in rows if "eval_loss" in r}
    assert sorted(evals) == [3, 6, 8] and all("loss" in evals[s] for s in evals)  # merged into the step rows
    assert evals[8]["eval_loss"] == pytest.approx(t.evaluator.history[-1].loss)
    stopper = Recorder(stop_at=3)
    res = Trainer(_cfg(tmp_path, data, model_unique="stop"), callbacks=[stopper]).fit()
    assert res.stop_reason == "requested" and res.step == 4  # the step in flight completes
    assert (Path(tmp_path / "ckpt" / "stop" / "4")).is_dir()  # a final checkpoint


def _result() -> EvalResult:
    return EvalResult(step=5, loss=1.5, perplexity=4.48, tokens=100, task_loss={"a": 1.0, "b": 2.0},
                      task_tokens={"a": 50, "b": 50}, is_best=True, answers={"q": "a"})


def test_tensorboard_and_jsonl_loggers_write_evaluations():
    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, v, step):
            self.calls.append((tag, v, step))

        def add_text(self, tag, text, step):
            self.calls.append((tag, text, step))

        def flush(self):
            pass

    w = Writer()
    TensorBoardLogger(w).on_eval(None, _result())
    tags = {c[0] for c in w.calls}
    assert {"Loss/eval", "Loss/eval/a", "Loss/eval/b", "Eval/perplexity", "Eval/answers"} <= tags
    rows = []
    JsonlLogger(rows.append).on_eval(None, _result())
    assert rows[0]["kind"] == "eval" and rows[0]["eval_loss/b"] == 2.0 and rows[0]["eval_answers"] == {"q": "a"}


def test_optional_loggers_report_missing_packages_and_log_when_present(monkeypatch):
    for name, cls in (("wandb", WandbLogger), ("mlflow", MLflowLogger), ("swanlab", SwanLabLogger)):
        monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(ImportError, match=f"pip install {name}"):
            cls()
    logged = []

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finish")

    fake = types.SimpleNamespace(init=lambda **kw: Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer = types.SimpleNamespace(config=TrainConfig(model="tiny"))
    cb = WandbLogger(mode="offline")
    cb.on_step_end(trainer, 1, {"loss": 2.0, "lr": 1e-3}, {"a": 2.0})
    cb.on_eval(trainer, _result())
    cb.on_fit_end(trainer, None)
    assert logged[0] == (1, {"train/loss": 2.0, "train/lr": 1e-3, "train/loss/a": 2.0})
    assert logged[1][0] == 5 and logged[1][1]["eval/loss/b"] == 2.0 and logged[-1] == "finish"


def test_evaluation_settings_are_checked(tmp_path, data):
    from fm9g._io import ConfigError

    with pytest.raises(ConfigError, match="set eval_iters"):
        _cfg(tmp_path, data, keep_best=True)
    with pytest.raises(ConfigError, match="eval_split"):
        _cfg(tmp_path, data, eval_split=1.5)
    with pytest.raises(ValueError, match="no held-out data"):
        Trainer(_cfg(tmp_path, data, eval_split=0.0, eval_iters=2))
