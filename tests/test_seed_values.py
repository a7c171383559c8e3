"""Values copied from the original FM9G scripts (the seed document's run_bmtrain.sh 参数详细介绍 and
its resume / LoRA recipes) do what their user meant, or stop with a message that says what to do."""
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from fm9g._io import ConfigError
from fm9g.training import checkpoint as ck
from fm9g.training.config import TrainConfig
from fm9g.training.metrics import read_train_stats
from fm9g.training.trainer import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]


class _Loader:
    """Packed rows of 2 tasks ("alpha", "beta"); `limit` batches, then the data ends (None: never)."""

    task_names = ["alpha", "beta"]

    def __init__(self, limit=None):
        self.i, self.limit = 0, limit

    def __iter__(self):
        while self.limit is None or self.i < self.limit:
            g = torch.Generator().manual_seed(self.i)
            ids = torch.randint(3, 99, (2, 16), generator=g)
            labels = torch.roll(ids, -1, 1)
            labels[:, [0, 15]] = -100
            self.i += 1
            yield {"input_ids": ids, "labels": labels, "task_ids": torch.tensor([[0] * 16, [1] * 16]),
                   "task_names": list(self.task_names)}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = int(state["i"])


def _seed_cfg(tmp_path, **kw):
    """The seed's launcher values (strings as written there) on a tiny model."""
    d = {"model": "tiny", "tensorboard_all_tasks": "0", "stop_when_end": "0", "only_load_model": "0",
         "load_dataloader_ckpt": "1", "pretrained_model": "", "resume_ckpt": "", "exp_group": "",
         "train_iters": "6", "save_iters": "3", "max_length": "16", "batch_size": "2", "lr": "1e-3",
         "warmup_iters": "2", "lr_scheduler": "Cosine", "inspect_iters": "0", "progress_bar": False,
         "save": str(tmp_path / "data" / "checkpoints"), "model_unique": "7b", "tensorboard": None}
    d.update(kw)
    return TrainConfig.from_dict(d, source="seed")


def _fit(cfg, loader=None, **kw):
    out = io.StringIO()
    res = Trainer(cfg, loader=loader if loader is not None else _Loader(limit=40), log_stream=out, **kw).fit()
    return res, out.getvalue()


# ------------------------------------------------------------------------------------------ issue 14
def test_stop_when_end_0_stops_at_train_iters(tmp_path):
    """Item 1: stop_when_end "0" with data that keeps coming trains exactly train_iters steps."""
    res, _ = _fit(_seed_cfg(tmp_path), _Loader(limit=40))
    assert res.step == 6 and len(res.losses) == 6 and res.stop_reason == "train_iters"
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "data" / "checkpoints" / "7b")] == [3, 6]


def test_stop_when_end_decides_only_what_happens_when_the_data_ends(tmp_path):
    """Item 1: data ending before train_iters: stop_when_end true stops there; false is an error
    that names the step (after the final checkpoint is written)."""
    res, printed = _fit(_seed_cfg(tmp_path, stop_when_end="1", model_unique="a"), _Loader(limit=4))
    assert res.step == 4 and res.stop_reason == "data_exhausted"
    assert "data ran out after iteration 4 of train_iters=6" in printed
    with pytest.raises(TrainingError, match=r"ran out after iteration 4 of train_iters=6.*stop_when_end: true"):
        _fit(_seed_cfg(tmp_path, model_unique="b"), _Loader(limit=4))
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "data" / "checkpoints" / "b")] == [3, 4]


def test_seed_resume_recipe_does_not_overwrite_the_run_and_says_what_it_restores(tmp_path):
    """Item 2: resume_ckpt=3 with only_load_model "1", load_dataloader_ckpt "0", pretrained_model ""
    (the seed's recipe) would restart at step 0 over checkpoints 3 and 6: refused, naming the options;
    the header says exactly what a resume restores."""
    _fit(_seed_cfg(tmp_path, stop_when_end="1"))  # the first run: checkpoints 3 and 6
    run = tmp_path / "data" / "checkpoints" / "7b"
    before = {p.name: (p / f"fm9g_live_checkpoint-{p.name}.pt").read_bytes() for _, p in ck.list_checkpoints(run)}
    assert sorted(before) == ["3", "6"]
    recipe = dict(resume_ckpt="3", only_load_model="1", load_dataloader_ckpt="0", pretrained_model="")
    with pytest.raises(ConfigError) as err:
        _fit(_seed_cfg(tmp_path, **recipe))
    msg = str(err.value)
    assert "only_load_model" in msg and "step 0" in msg and "model_unique" in msg and "overwrite_run" in msg
    assert {p.name: (p / f"fm9g_live_checkpoint-{p.name}.pt").read_bytes() for _, p in ck.list_checkpoints(run)} == before
    # into a new run folder: a new run from the step-3 weights, and the header says so
    res, printed = _fit(_seed_cfg(tmp_path, **{**recipe, "resume_ckpt": str(run / "3")}, model_unique="7b_new"))
    assert res.step == 6
    assert "start: loaded the weights of" in printed and "(only_load_model): a new run from step 0 with a fresh optimizer" in printed
    # a real resume continues the run and names what came back
    res, printed = _fit(_seed_cfg(tmp_path, resume_ckpt="3", only_load_model="0", train_iters="7"))
    assert res.step == 7
    assert "start: resumed from" in printed and "weights, optimizer, data position, step 3" in printed
    res, printed = _fit(_seed_cfg(tmp_path, resume_ckpt="6", load_dataloader_ckpt="0", train_iters="8"))
    assert "restored weights, optimizer, step 6 and token counters, RNG; NOT restored: data position" in printed
    fresh = _fit(_seed_cfg(tmp_path, model_unique="fresh"))[1]
    assert "start: randomly initialised weights (no pretrained_model); fresh optimizer; data from the start; step 0" in fresh


def test_lora_without_pretrained_base_is_refused_unless_asked_for(tmp_path):
    """Item 3: the seed's LoRA keys with pretrained_model "" would train LoRA on a random base."""
    lora = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0,
                lora_layer="[\"project_q\",\"project_k\",\"project_v\",\"w_0\",\"w_1\",\"w_out\"]", stop_when_end="1")
    with pytest.raises(ConfigError, match=r"pretrained_model is not set.*lora_random_base: true"):
        _fit(_seed_cfg(tmp_path, **lora))
    assert not (tmp_path / "data" / "checkpoints" / "7b").exists()
    res, printed = _fit(_seed_cfg(tmp_path, **lora, lora_random_base="true"))
    assert res.step == 6 and "LoRA (freshly initialised) on randomly initialised weights" in printed


def test_rerunning_a_run_folder_is_refused_unless_overwrite_run(tmp_path):
    """Item 4: the same command twice would overwrite the checkpoints and append duplicate rows."""
    cfg = _seed_cfg(tmp_path, stats_dir="auto")
    _fit(cfg)
    run = cfg.run_dir
    rows = (run / "train_stats" / "0.jsonl").read_text()
    with pytest.raises(ConfigError) as err:
        _fit(cfg)
    msg = str(err.value)
    assert 'resume_ckpt: "latest"' in msg and "model_unique" in msg and "overwrite_run: true" in msg
    assert (run / "train_stats" / "0.jsonl").read_text() == rows
    res, printed = _fit(cfg.override({"overwrite_run": "1", "train_iters": 4}))
    assert res.step == 4 and "overwrite_run: deleted 2 checkpoint(s), 1 train_stats file(s)" in printed
    assert [r["iteration"] for r in map(json.loads, (run / "train_stats" / "0.jsonl").read_text().splitlines())] == [1, 2, 3, 4]
    assert [s for s, _ in ck.list_checkpoints(run)] == [3, 4]
    # one Trainer that fits again continues its own run (not refused)
    t = Trainer(_seed_cfg(tmp_path, model_unique="again"), loader=_Loader(limit=40), log_stream=io.StringIO())
    t.fit()
    t.config.train_iters = 8
    assert t.fit().step == 8


def _scalars(logdir):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_trainer import _read_scalars

    return _read_scalars(logdir)


def test_tensorboard_all_tasks_0_keeps_per_task_loss_on_console_and_in_stats(tmp_path):
    """Item 5: the seed's default tensorboard_all_tasks "0" turns off only the per-task TensorBoard scalars."""
    cfg = _seed_cfg(tmp_path, stats_dir="auto", tensorboard="auto", log_iters=1)
    _, printed = _fit(cfg)
    assert "task_loss: | alpha:" in printed
    rows = read_train_stats(cfg.run_dir)
    assert all("task_loss/alpha" in r and "task_loss/beta" in r for r in rows)
    tags = _scalars(cfg.run_dir / "tensorboard")
    assert "Loss/train" in tags and "Loss/train/alpha" not in tags
    on = _seed_cfg(tmp_path, tensorboard_all_tasks="1", tensorboard="auto", model_unique="on")
    _fit(on)
    assert "Loss/train/alpha" in _scalars(on.run_dir / "tensorboard")


def test_tensorboard_original_layout(tmp_path, monkeypatch):
    """Item 9: `tensorboard: original` writes where the seed's `tensorboard --logdir .../data/tensorboard/7b` looks."""
    monkeypatch.chdir(tmp_path)
    cfg = _seed_cfg(tmp_path, tensorboard="original", exp_group="g1_")
    _fit(cfg)
    assert list((tmp_path / "data" / "tensorboard" / "g1_7b").glob("events.out.tfevents.*"))
    _fit(_seed_cfg(tmp_path, tensorboard="original", model_unique="7b2"))
    assert list((tmp_path / "data" / "tensorboard" / "7b2").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------ issue 15
@pytest.mark.parametrize("text, want", [("false", False), ("False", False), ("0", False), (0, False), (False, False),
                                        ("true", True), ("TRUE", True), ("1", True), (1, True), (True, True)])
def test_parse_bool_accepts_what_users_write(text, want):
    from fm9g._io import parse_bool

    assert parse_bool(text, "k") is want


@pytest.mark.parametrize("bad", ["maybe", "flase", "yes", 2, -1, None, [], ""])
def test_parse_bool_rejects_the_rest_naming_file_and_key(bad):
    from fm9g._io import parse_bool

    with pytest.raises(ConfigError, match=r"m\.json: tie_lm_head must be true/false"):
        parse_bool(bad, "tie_lm_head", "m.json")


def test_false_strings_in_a_model_json_are_false(tmp_path):
    """Item 4: "false" in a model JSON builds the architecture the user wrote."""
    from fm9g.models.config import FM9GConfig

    base = {"vocab_size": 99, "dim_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "dim_ff": 160}
    p = tmp_path / "m.json"
    p.write_text(json.dumps({**base, "tie_lm_head": "false", "qkv_bias": "false", "scale": "false",
                             "use_checkpoint": "0"}))
    cfg = FM9GConfig.from_json(p)
    assert (cfg.tie_lm_head, cfg.qkv_bias, cfg.scale, cfg.use_checkpoint) == (False, False, False, False)
    assert FM9GConfig.from_dict({**base, "tie_lm_head": "True", "qkv_bias": 1}).tie_lm_head is True
    p.write_text(json.dumps({**base, "qkv_bias": "nope"}))
    with pytest.raises(ConfigError, match=r"m\.json: qkv_bias must be true/false"):
        FM9GConfig.from_json(p)


def test_booleans_of_train_config_and_dataset_entries_use_the_same_parser(tmp_path):
    from fm9g.data.mixture import DatasetEntry, MixtureConfigError

    p = tmp_path / "t.json"
    p.write_text(json.dumps({"pretrain": {"save_final": "False", "ignore_cuda_oom": "1", "stop_when_end": 0}}))
    cfg = TrainConfig.from_json(p)
    assert (cfg.save_final, cfg.ignore_cuda_oom, cfg.stop_when_end) == (False, True, False)
    p.write_text(json.dumps({"pretrain": {"save_final": "sometimes"}}))
    with pytest.raises(ConfigError, match=r"t\.json: save_final must be true/false"):
        TrainConfig.from_json(p)
    e = DatasetEntry.from_dict({"dataset_name": "d", "task_name": "t", "path": "x", "allow_repeat": "false",
                                "do_compact": "1"})
    assert e.allow_repeat is False and e.do_compact is True
    with pytest.raises(MixtureConfigError, match="'allow_repeat' must be true or false"):
        DatasetEntry.from_dict({"dataset_name": "d", "task_name": "t", "path": "x", "allow_repeat": "sure"})


def test_config_values_errors_name_the_key(tmp_path):
    """Item 10: lora_r "x", model eps "nan", adam_betas outside [0, 1), adam_eps <= 0."""
    from fm9g.models.config import FM9GConfig

    p = tmp_path / "7b_lora.json"
    p.write_text(json.dumps({"finetune": {"lora_r": "x", "lora_alpha": 32}}))
    with pytest.raises(ConfigError, match=r"7b_lora\.json: lora_r must be an integer, got 'x'"):
        TrainConfig.from_json(p)
    m = tmp_path / "m.json"
    for value in ("nan", "inf", float("nan")):
        m.write_text(json.dumps({"vocab_size": 99, "dim_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                 "eps": value}))
        with pytest.raises(ConfigError, match=r"m\.json: eps must be a finite number"):
            FM9GConfig.from_json(m)
    for betas in ([0.9, 1.0], [-0.1, 0.95], "(0.9, 1.5)"):
        with pytest.raises(ConfigError, match=r"adam_betas must both be in \[0, 1\)"):
            TrainConfig.from_dict({"adam_betas": betas})
    for eps in (0, -1e-8, "inf"):
        with pytest.raises(ConfigError, match="adam_eps must be a finite number"):
            TrainConfig.from_dict({"adam_eps": eps})


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "examples"))
    from _toy import make_toy_tokenizer, write_sft_jsonl

    from fm9g import build_index

    d = tmp_path_factory.mktemp("toy")
    tok = make_toy_tokenizer(d / "tok")  # 400 tokens
    build_index(write_sft_jsonl(d / "a.jsonl"), d / "idx_a", language="en")
    build_index(write_sft_jsonl(d / "b.jsonl"), d / "idx_b", language="en")
    return d, tok


def test_abs_weight_overflow_is_a_clear_error(toy_data):
    """Item 10: abs_weight 1e308 on two entries: their sum overflows (ZeroDivisionError mid-fit before)."""
    from fm9g.data.mixture import MixtureConfigError, MixtureLoader
    from transformers import AutoTokenizer

    d, tok = toy_data
    mix = d / "mix.json"
    mix.write_text(json.dumps([
        {"dataset_name": n, "task_name": n, "path": f"idx_{n}", "abs_weight": 1e308, "transforms": "chatml"} for n in "ab"]))
    with pytest.raises(MixtureConfigError, match=r"abs_weight values \[1e\+308, 1e\+308\].*cannot be normalised"):
        loader = MixtureLoader.from_config(mix, AutoTokenizer.from_pretrained(tok), 64, 1)
        next(iter(loader))


def test_tokenizer_larger_than_the_model_vocabulary_fails_before_training(toy_data, tmp_path):
    """Item 10: a 400-token tokenizer on a 99-token model (IndexError mid-fit before)."""
    d, tok = toy_data
    mix = d / "mix1.json"
    mix.write_text(json.dumps([{"dataset_name": "a", "task_name": "a", "path": "idx_a", "abs_weight": 1,
                                "transforms": "chatml"}]))
    cfg = _seed_cfg(tmp_path, tokenizer_path=str(tok), data=str(mix), max_length="64", batch_size="1")
    with pytest.raises(ConfigError, match=r"has 400 tokens but the model's vocab_size is 99.*vocab_size >= 400"):
        Trainer(cfg, log_stream=io.StringIO()).fit()
    assert not cfg.run_dir.exists()


def test_device_cuda_without_cuda_is_one_line(tmp_path, monkeypatch, capsys):
    """Item 10 (issue 14 item 8): device cuda on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda' but CUDA is not available.*device: 'cpu'"):
        Trainer(_seed_cfg(tmp_path, device="cuda"), loader=_Loader())
    from fm9g.cli import main

    cfg_path = tmp_path / "train.json"
    _seed_cfg(tmp_path).to_json(cfg_path)
    assert main(["train", "--config", str(cfg_path), "--set", "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="device must be"):
        TrainConfig(device="gpu")
