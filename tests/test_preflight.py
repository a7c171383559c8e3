"""`fm9g train --check` on the migration page's layout (issue 32): every problem at once, exit 2, in
seconds; a clean config gets a one-screen summary; the one rule for relative paths; duplicate JSON
keys; preset aliases and the config.json beside a .pt; the schedule's words and warnings."""
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fm9g
from fm9g._io import ConfigError
from fm9g.training.config import TrainConfig
from fm9g.training.preflight import check_config_file
from fm9g.training.schedules import schedule_text, schedule_warnings

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def seed_app(tmp_path, smollm2_tokenizer_dir, monkeypatch):
    """The migration page's `apps/fm9g_7b/` folder, made by the page's own first block, with both indexes."""
    app = tmp_path / "apps" / "fm9g_7b"
    app.mkdir(parents=True)
    monkeypatch.chdir(app)
    doc = (ROOT / "docs" / "migration.md").read_text(encoding="utf-8")
    exec(re.findall(r"```python\n(.*?)```", doc, re.S)[0], {"TOKENIZER_DIR": str(smollm2_tokenizer_dir)})
    fm9g.build_index("raw/alpaca_zh.jsonl", "indexed/data_ralpaca_zh", language="zh")
    fm9g.build_index("raw/medical_train.jsonl", "indexed/medical_train", language="zh")
    monkeypatch.chdir(tmp_path)  # the rule does not depend on the working directory
    return app


def _check(config: Path, *sets: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `fm9g train --check`; also its wall time and its CPU time (user + system: what the check
    costs on a CPU, whatever else the machine runs at the time)."""
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-m", "fm9g", "train", "--config", str(config), "--check",
                          *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, env=ENV,
                         cwd=config.parent.parent.parent, timeout=120)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, time.perf_counter() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def test_check_reports_four_planted_faults_at_once_in_seconds(seed_app):
    config = seed_app / "train_configs" / "7b.json"
    clean, wall_clean, cpu_clean = _check(config)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "is ready to train" in clean.stdout and len(clean.stdout.splitlines()) <= 24
    assert f"data: medical_o1_reasoning: 40 lines in {seed_app / 'dataset_configs' / '../indexed/medical_train'}" in clean.stdout
    # four faults: the seed document's tokenizer_path set twice (the last, a typo, wins), a scheduler
    # typo, a dataset path one level off, and that typo'd tokenizer folder
    text = config.read_text(encoding="utf-8")
    text = text.replace('"lr_scheduler": "Cosine"', '"lr_scheduler": "Cosin"')
    text = text.replace('"dataset_config": "data_test",', '"dataset_config": "data_test",\n  "tokenizer_path": "./ckpts",')
    config.write_text(text, encoding="utf-8")
    mix = seed_app / "dataset_configs" / "data_test.json"
    mix.write_text(mix.read_text(encoding="utf-8").replace("../indexed/medical_train", "./indexed/medical_train"))
    out, wall, cpu = _check(config)
    assert out.returncode == 2, out.stdout + out.stderr
    problems = [ln for ln in out.stdout.splitlines() if re.match(r"  \d+\. ", ln)]
    assert len(problems) == 4, out.stdout
    assert 'key "tokenizer_path" is set more than once in one object (lines ' in out.stdout
    assert "lr_scheduler = 'cosin' is not one of" in out.stdout and "did you mean 'cosine'" in out.stdout
    assert f"tried {seed_app / 'ckpts'}" in out.stdout
    assert (f"dataset path {seed_app / 'dataset_configs' / 'indexed' / 'medical_train'} is not an index directory"
            in out.stdout and f"a folder of that name exists at {seed_app / 'indexed' / 'medical_train'}" in out.stdout)
    assert cpu < 5.0, (cpu, wall)  # the whole command: interpreter, imports (torch) and the check
    print(f"--check: clean {cpu_clean:.2f} s CPU ({wall_clean:.2f} s wall), four faults {cpu:.2f} s CPU ({wall:.2f} s wall)")


def test_the_seed_layout_trains_from_any_working_directory(seed_app, tmp_path):
    """The one rule: ./ckpt, ./9g_models/7b.pt, "7b" and save resolve against apps/fm9g_7b/."""
    cfg = TrainConfig.from_json(seed_app / "train_configs" / "7b.json")
    assert cfg.base_dir == str(seed_app.resolve()) and os.getcwd() == str(tmp_path)
    assert cfg.run_dir == seed_app.resolve() / "checkpoints" / "7b"
    assert cfg.require_path(cfg.tokenizer_path, "tokenizer_path") == str(seed_app.resolve() / "ckpt")
    (tmp_path / "tok_here").mkdir()  # in the working directory, not beside the config: not taken, but named
    with pytest.raises(FileNotFoundError) as err:
        cfg.require_path("./tok_here", "tokenizer_path")
    assert f"tried {seed_app.resolve() / 'tok_here'}" in str(err.value)
    assert f"a folder of that name exists at {tmp_path / 'tok_here'}" in str(err.value)


def test_preset_aliases_and_the_config_json_beside_a_pt(seed_app):
    from fm9g.convert.hf import hf_to_bmt
    from fm9g.models.config import FM9GConfig
    from fm9g.training.model_source import model_config_of

    assert FM9GConfig.from_name("7b") == FM9GConfig.from_name("fm9g-7b")
    hf_to_bmt(seed_app / "ckpt", seed_app / "9g_models" / "7b.pt")
    cfg = TrainConfig(pretrained_model=str(seed_app / "9g_models" / "7b.pt"))
    assert model_config_of(cfg).dim_model == 64
    with pytest.raises(FileNotFoundError, match=r"neither a model config JSON \(tried .*model_configs/7c.json"):
        model_config_of(TrainConfig(model="7c"))


def test_duplicate_keys_are_an_error_naming_key_and_line(tmp_path):
    p = tmp_path / "train.json"
    p.write_text('{\n "lr": 1e-3,\n "train_iters": 5,\n "lr": 2e-3\n}\n')
    with pytest.raises(ConfigError, match=r'key "lr" is set more than once in one object \(lines 2, 4\)'):
        TrainConfig.from_json(p)


@pytest.mark.parametrize("kw, text, warning", [
    (dict(lr_scheduler="cosine", warmup_iters=20, train_iters=2, drop_iters=0.1),
     "lr 0.01 cosine: warmup to step 20, then cosine down to 10% at step 2; 2 steps", "only rises"),
    (dict(lr_scheduler="warmupstabledrop", warmup_iters=10, drop_iters=20, train_iters=100),
     "warmupstabledrop: warmup to step 10, then constant, then from step 80 down to 10% at step 100", None),
    (dict(lr_scheduler="warmupstableexp", warmup_iters=0, drop_begin=-1, train_iters=100),
     "lr 0.01 warmupstableexp: constant; 100 steps", "never starts"),
])
def test_schedule_words_are_whole_steps_and_only_the_phases_it_has(kw, text, warning):
    cfg = TrainConfig(lr=1e-2, **kw)
    assert text in schedule_text(cfg)
    warnings = schedule_warnings(cfg)
    assert (warning is None and not warnings) or (warning is not None and warning in " ".join(warnings))


def test_check_of_the_lora_config_names_a_missing_base_and_unknown_targets(seed_app):
    from fm9g.convert.hf import hf_to_bmt

    lora = seed_app / "train_configs" / "7b_lora.json"
    report = check_config_file(lora)
    assert not report.ok and any(f"tried {seed_app / '9g_models' / '7b.pt'}" in p for p in report.problems)
    hf_to_bmt(seed_app / "ckpt", seed_app / "9g_models" / "7b.pt")
    report = check_config_file(lora)
    assert report.ok, report.text()
    assert "LoRA: r 16, alpha 32" in report.text() and "model: " in report.text()  # the model: config.json beside the .pt
    report = check_config_file(lora, overrides=['lora_layer=["project_q","nope"]'])
    assert not report.ok and "nope" in report.text(), report.text()


def test_a_dataset_path_one_level_off_names_the_folder_that_exists(seed_app):
    from fm9g.data.mixture import MixtureLoader

    mix = seed_app / "dataset_configs" / "data_test.json"
    mix.write_text(mix.read_text(encoding="utf-8").replace("../indexed/medical_train", "./indexed/medical_train"))
    with pytest.raises(Exception) as err:
        MixtureLoader.from_config(str(mix), str(seed_app / "ckpt"), 64, 1)
    msg = str(err.value)
    assert f"dataset path {seed_app / 'dataset_configs' / 'indexed' / 'medical_train'} does not exist" in msg
    assert f"a folder of that name exists at {seed_app / 'indexed' / 'medical_train'}" in msg
