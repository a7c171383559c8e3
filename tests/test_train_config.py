"""TrainConfig: original train_configs shapes, aliases, string values, unknown keys, overrides."""
import json

import pytest

from fm9g.training.config import ConfigError, TrainConfig


def _write(tmp_path, obj, name="train.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


def test_original_7b_json_loads(tmp_path):
    # the shape of apps/fm9g_7b/train_configs/7b.json
    p = _write(tmp_path, {"pretrain": {"train_iters": 1000, "batch_size": 1, "max_length": 4096, "n_gpus": 8,
                                       "lr": 0.0001, "save_iters": 5}})
    cfg = TrainConfig.from_json(p)
    assert (cfg.train_iters, cfg.batch_size, cfg.max_length, cfg.lr, cfg.save_iters) == (1000, 1, 4096, 1e-4, 5)
    assert cfg.lora is None
    assert cfg.base_dir == str(tmp_path.resolve())


def test_original_lora_json_loads_finetune_section(tmp_path):
    p = _write(tmp_path, {
        "pretrain": {"train_iters": 1000, "batch_size": 1, "max_length": 4096, "n_gpus": 8, "lr": 0.0001, "save_iters": 5},
        "finetune": {"lora_layer": "[\"project_q\",\"project_k\",\"project_v\",\"attention_out\",\"w_0\",\"w_1\",\"w_out\"]",
                     "lora_r": 64, "lora_alpha": 32, "lora_dropout": 0.0},
    })
    cfg = TrainConfig.from_json(p)
    assert cfg.lora.r == 64 and cfg.lora.alpha == 32 and cfg.lora.dropout == 0.0
    assert cfg.lora.target_modules == ["project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out"]
    only = TrainConfig.from_json(p, section="pretrain")
    assert only.lora is None


def test_launcher_keys_strings_and_hyphens(tmp_path):
    # the bash launcher's keys and string values ("4096", "True", "Cosine"), hyphen spellings
    p = _write(tmp_path, {"pretrain": {
        "pretrained_model": "./9g_models/7b.pt", "resume_ckpt": "", "tokenizer_path": "./ckpt",
        "dataset_config": "data_test", "model_unique": "7b", "config": "7b", "n_gpus": 2, "flash": "cuda",
        "max_length": "4096", "local": "False", "dataloader": "indexed", "save": "True", "load_grad": "False",
        "grad_ckpt_num": "160", "exp_group": "", "ignore_cuda_oom": "1", "tensorboard_all_tasks": "0",
        "stop_when_end": "0", "only_run_dataloader": "0", "eps": "1e-6", "inspect_iters": "100",
        "strict_state_dict": "1", "resume_no_optimze": "0", "tp_size": "1", "async_save": "False",
        "batch_size": "1", "save_iters": "500", "train_iters": "10000", "dataloader_num_threads": 1,
        "dataloader_prefetch": 1, "dataloader_prefetch_factor": 1, "dataloader_num_workers": 1,
        "parallel_load_datastate": "8", "lr": "1e-2", "warmup_iters": "20", "drop_iters": "0.1",
        "only_load_model": "1", "lr_scheduler": "Cosine", "load_dataloader_ckpt": "0", "drop_begin": "-1",
        "drop_rate": "0.5", "use_checkpoint": "0", "weight-decay": "0.1", "clip-grad": 1.0, "grad-accum": 2,
        "seed": "1234", "offload": "True",
    }})
    cfg = TrainConfig.from_json(p)
    assert cfg.max_length == 4096 and cfg.train_iters == 10000 and cfg.lr == 1e-2
    assert cfg.lr_scheduler == "cosine" and cfg.warmup_iters == 20 and cfg.drop_steps == pytest.approx(1000)
    assert cfg.ignore_cuda_oom is True and cfg.stop_when_end is False and cfg.use_checkpoint is False
    assert cfg.log_task_loss is False and cfg.only_load_model is True and cfg.load_dataloader_ckpt is False
    assert cfg.resume_ckpt is None and cfg.save == "checkpoints" and cfg.model == "7b" and cfg.data == "data_test"
    assert cfg.grad_accum == 2 and cfg.weight_decay == 0.1 and cfg.offload is True and cfg.num_workers == 1


def test_unknown_key_names_key_and_suggests(tmp_path):
    p = _write(tmp_path, {"pretrain": {"train_iter": 10}})
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_json(p)
    msg = str(e.value)
    assert "train_iter" in msg and "train_iters" in msg and str(p) in msg
    with pytest.raises(ConfigError, match="'warmup_iters'"):
        TrainConfig.from_dict({"warmup_iter": 3})


@pytest.mark.parametrize("key,value,match", [
    ("lr", "fast", "lr must be a number"),
    ("train_iters", 0, "train_iters must be >= 1"),
    ("batch_size", 1.5, "batch_size must be an integer"),
    ("stop_when_end", "maybe", "stop_when_end must be true/false"),
    ("lr_scheduler", "cosin", "did you mean 'cosine'"),
    ("engine", "deepspeed", "engine"),
    ("lr", -1, "lr must be > 0"),
])
def test_bad_values_fail_early_naming_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({key: value})


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n "lr": 1e-4,\n}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 3"):
        TrainConfig.from_json(p)
    p2 = _write(tmp_path, {"pretrain": {"lr": 1}, "train_iters": 3}, "mixed.json")
    with pytest.raises(ConfigError, match="train_iters"):
        TrainConfig.from_json(p2)


def test_set_overrides():
    cfg = TrainConfig(lr=1e-4, train_iters=10)
    new = cfg.override(["lr=3e-4", "train-iters=20", "lr_scheduler=WSD", "resume_ckpt=5", "lora_r=8"])
    assert new.lr == 3e-4 and new.train_iters == 20 and new.lr_scheduler == "warmupstabledrop"
    assert new.resume_ckpt == "5" and new.lora.r == 8
    assert cfg.lr == 1e-4  # the original is unchanged
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        cfg.override(["lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        cfg.override(["lr"])


def test_round_trip_json(tmp_path):
    cfg = TrainConfig(model="tiny", lr=2e-4, lora={"r": 4, "alpha": 8, "target_modules": ["project_q"]})
    path = tmp_path / "out.json"
    cfg.to_json(path)
    again = TrainConfig.from_json(path)
    assert again.lr == 2e-4 and again.model == "tiny" and again.lora.r == 4 and again.lora.target_modules == ["project_q"]
    assert again.adam_betas == (0.9, 0.95)


def test_bare_names_are_looked_up_like_the_original(tmp_path):
    app = tmp_path / "app"
    (app / "train_configs").mkdir(parents=True)
    (app / "model_configs").mkdir()
    (app / "model_configs" / "7b.json").write_text("{}")
    p = _write(app / "train_configs", {"pretrain": {"config": "7b"}}, "7b.json")
    cfg = TrainConfig.from_json(p)
    assert cfg.find_file("7b", "model_configs") == str(app / "model_configs" / "7b.json")
    assert cfg.find_file("nope", "model_configs") is None


@pytest.mark.parametrize("name", ["sft_7b", "pretrain_7b", "lora_7b"])
def test_example_configs_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / f"{name}.json"
    cfg = TrainConfig.from_json(path)
    assert cfg.model == "fm9g-7b"
    assert cfg.find_file(cfg.data, "dataset_configs").endswith("dataset_configs/data_example.json")
    assert (cfg.lora is not None) == (name == "lora_7b")


def test_compile_is_auto_true_or_false():
    assert TrainConfig().compile == "auto"
    assert TrainConfig().override(["compile=false"]).compile is False
    assert TrainConfig().override(["compile=true"]).compile is True
    with pytest.raises(ConfigError, match="compile must be true, false or \"auto\""):
        TrainConfig(compile="sometimes")
