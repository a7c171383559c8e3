"""The `fm9g` command line: the original FM9G scripts' flags, --version, one-line user errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fm9g
from fm9g.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           TOKENIZERS_PARALLELISM="false")


def fm9g_cli(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m fm9g ARGV` in `cwd`, as a user types it."""
    return subprocess.run([sys.executable, "-m", "fm9g", *argv], cwd=cwd, env=env or ENV, capture_output=True,
                          text=True, timeout=300)


def parsed(*argv: str) -> dict:
    """The parsed command line, without the bookkeeping entries."""
    return {k: v for k, v in vars(build_parser().parse_args(list(argv))).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- original flags


def test_build_index_takes_the_original_script_flags(tmp_path):
    # the seed's data_preprocess.sh: python convert_json2index.py --path X --language zh --output Y
    src = tmp_path / "alpaca_zh.jsonl"
    src.write_text("".join(json.dumps({"input": f"问题{i}", "output": f"回答{i}。"}, ensure_ascii=False) + "\n"
                           for i in range(5)), encoding="utf-8")
    out = fm9g_cli("build-index", "--path", str(src), "--language", "zh", "--output", "data_ralpaca_zh", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "data_ralpaca_zh" / "meta.json").read_text())
    assert meta["nlines"] == 5 and meta["language"] == "zh"
    assert parsed("build-index", "--path", "a.jsonl", "--output", "idx") == parsed("build-index", "a.jsonl", "idx")


def test_build_index_refuses_both_forms_and_names_a_missing_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["build-index", "--path", "a.jsonl", "b.jsonl", "idx"])
    assert err.value.code == 2 and "SRC given twice" in capsys.readouterr().err
    assert main(["build-index", "--path", str(tmp_path / "a.jsonl")]) == 2
    assert "required: OUT (or --output)" in capsys.readouterr().err


def test_convert_takes_the_original_script_flags():
    # the seed's bmtrain_2_hgface.py command lines (full model, then LoRA merge)
    full = ("--huggingface-ref-dir", "./ckpt", "--bmtrain-ckpt-path", "ckpt/10/fm9g_live_checkpoint-10.pt",
            "--huggingface-save-dir", "9g_models/hf-10")
    assert parsed("convert", "bmt2hf", *full) == parsed(
        "convert", "bmt2hf", "ckpt/10/fm9g_live_checkpoint-10.pt", "9g_models/hf-10", "--reference-dir", "./ckpt")
    assert parsed("convert", "bmt2hf", "-r", "./ckpt", "-i", "m.pt", "-o", "hf") == parsed(
        "convert", "bmt2hf", "m.pt", "hf", "--reference-dir", "./ckpt")
    lora = parsed("convert", "bmt2hf", *full, "--lora-ckpt-path", "l.pt", "--lora-config-path", "7b_lora.json")
    assert (lora["lora"], lora["lora_config"]) == ("l.pt", "7b_lora.json")
    assert parsed("convert", "hf2bmt", "--huggingface-dir", "./ckpt", "--bmtrain-ckpt-path", "9g_models/7b.pt") == \
        parsed("convert", "hf2bmt", "./ckpt", "9g_models/7b.pt")


def test_lora_merge_with_the_original_flags_runs(tmp_path, capsys):
    from fm9g import FM9GConfig, FM9GModel, LoraConfig, apply_lora, bmt_to_hf
    from fm9g.models.lora import lora_state_dict

    torch.manual_seed(0)
    cfg = FM9GConfig.from_name("tiny", dtype="fp32")
    model = FM9GModel(cfg)
    torch.save(model.state_dict(), tmp_path / "7b.pt")
    cfg.to_json(tmp_path / "config.json")
    bmt_to_hf(tmp_path / "7b.pt", tmp_path / "ckpt")  # stands in for the downloaded HF directory
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["project_q", "project_v"]))
    lora = {k: torch.randn_like(v) for k, v in lora_state_dict(model).items()}
    torch.save(lora, tmp_path / "fm9g_live_checkpoint-10.pt")
    (tmp_path / "7b_lora.json").write_text(json.dumps({"finetune": {"lora_r": 4, "lora_alpha": 8}}))
    assert main(["convert", "bmt2hf", "--huggingface-ref-dir", str(tmp_path / "ckpt"),
                 "--bmtrain-ckpt-path", str(tmp_path / "7b.pt"), "--huggingface-save-dir", str(tmp_path / "hf-lora-10"),
                 "--lora-ckpt-path", str(tmp_path / "fm9g_live_checkpoint-10.pt"),
                 "--lora-config-path", str(tmp_path / "7b_lora.json")]) == 0, capsys.readouterr().err
    assert (tmp_path / "hf-lora-10" / "config.json").exists()


def test_version_and_help_show_the_aliases(tmp_path):
    out = fm9g_cli("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"fm9g {fm9g.__version__}"
    help_text = fm9g_cli("convert", "bmt2hf", "--help", cwd=tmp_path).stdout
    for flag in ("--bmtrain-ckpt-path", "--huggingface-save-dir", "--huggingface-ref-dir", "--lora-ckpt-path",
                 "--lora-config-path"):
        assert flag in help_text
    assert "--path" in fm9g_cli("build-index", "--help", cwd=tmp_path).stdout


# ----------------------------------------------------------------------------- one-line errors


TINY_MODEL = {"vocab_size": 512, "dim_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "dim_ff": 64}


def _train_config(tmp_path: Path, **values) -> Path:
    """A tiny train config (toy tokenizer and data) with `values` on top."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from _toy import make_toy_tokenizer, write_text_jsonl
    finally:
        sys.path.remove(str(ROOT / "examples"))
    fm9g.build_index(write_text_jsonl(tmp_path / "text.jsonl"), tmp_path / "idx", language="en")
    (tmp_path / "mix.json").write_text(json.dumps([{"dataset_name": "t", "task_name": "t", "path": "idx",
                                                    "abs_weight": 1.0}]))
    cfg = {"model": TINY_MODEL, "tokenizer_path": str(make_toy_tokenizer(tmp_path / "tok")),
           "dataset_config": "mix.json", "train_iters": 1, "save": "ckpt", "max_length": 32, **values}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, monkeypatch):
    cfg = _train_config(tmp_path, device="cuda")
    out = fm9g_cli("train", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("fm9g train: error: ") and "CUDA is not available" in lines[0]
    assert "device" in lines[0] and "'cpu'" in lines[0]
    # FM9G_DEBUG=1: the traceback, for a bug report
    monkeypatch.setenv("FM9G_DEBUG", "1")
    with pytest.raises((AssertionError, RuntimeError, ValueError), match="CUDA"):
        main(["train", "--config", str(cfg)])


@pytest.mark.skipif(__import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn installed")
def test_flash_attn_without_flash_attn_is_one_line(tmp_path):
    cfg = _train_config(tmp_path, model={**TINY_MODEL, "attn_impl": "flash_attn"})
    out = fm9g_cli("train", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line, = out.stderr.strip().splitlines()
    assert line.startswith("fm9g train: error: ") and "attn_impl" in line and "pip install" in line


def test_refused_checkpoint_is_one_line_with_exit_2(tmp_path):
    """A CheckpointError / TrainingError is a user error like any other: one line, exit status 2."""
    (tmp_path / "half" / "3").mkdir(parents=True)  # a step folder without its files
    cfg = _train_config(tmp_path, resume_ckpt=str(tmp_path / "half" / "3"))
    out = fm9g_cli("train", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line, = out.stderr.strip().splitlines()
    assert line.startswith("fm9g train: error: ") and "half" in line, line


def test_user_errors_and_bugs_are_told_apart():
    from fm9g._io import ConfigError
    from fm9g.cli import is_user_error
    from fm9g.models.attention import AttentionUnavailableError

    assert is_user_error(ConfigError("x")) and is_user_error(FileNotFoundError("x"))
    assert is_user_error(AttentionUnavailableError("x"))
    assert not is_user_error(TypeError("a bug")) and not is_user_error(ZeroDivisionError())


# ----------------------------------------------------------------------------- packaging


def test_editable_install_has_no_setuptools_warning(tmp_path):
    """`pip install -e .` builds its editable wheel without setuptools' "Editable installation ...
    folders with the same name" warning (a plain .pth file, no import-hook finder)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "fm9g", tmp_path / "fm9g", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-W", "always", "-c",
                          "from setuptools import build_meta; print(build_meta.build_editable('dist'))"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Editable installation" not in out.stdout + out.stderr, out.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        pth = [n for n in z.namelist() if n.endswith(".pth")]
        assert len(pth) == 1 and z.read(pth[0]).decode().strip() == str(tmp_path)


def test_no_deprecated_torch_dtype_keyword():
    """transformers 5 warns on `from_pretrained(..., torch_dtype=...)`; the examples and the library
    pass `dtype=` (the quickstart printed the warning on every first run)."""
    import re

    files = sorted((ROOT / "examples").glob("*.py")) + sorted((ROOT / "fm9g").rglob("*.py"))
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"\btorch_dtype=(?!=)", line)]
    assert not hits, f"torch_dtype= keyword (use dtype=): {hits}"
