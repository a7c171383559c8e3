"""CPU smoke of benchmarks/run.py: the user's path (Trainer.fit over a real index through
MixtureLoader with a worker, stats rows) on tiny shapes; the GPU figures come from the same script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_py_tiny_runs_every_cpu_workload(tmp_path):
    """``python benchmarks/run.py --tiny W1 W2 W3 W4 W5 W6 W1@host`` on CPU: every workload gives its
    figures, the training ones from the Trainer's own stats rows."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--tiny", "W1", "W2", "W3", "W4", "W5",
                        "W6", "W1@host", "--out", str(tmp_path)], cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "run.json").read_text())
    rows = {r["workload"]: r for r in report["fm9g"]}
    assert set(rows) == {"W1", "W2", "W3", "W4", "W5", "W6", "W1@host"}
    for name in ("W1", "W2", "W3", "W1@host"):
        r = rows[name]
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["steps"] == 2 and r["skipped"]["nonfinite"] == 0
        assert len(r["iter_times"]) == 3  # one stats row per step, from the Trainer's own logging
    assert rows["W3"]["grad_accum"] == 2 and rows["W3"]["optimizer"] == "adamw_bf16"
    for name in ("W4", "W5", "W6"):
        assert "error" not in rows[name], rows[name]
        assert rows[name]["figures"] and all(value >= 0 for _, value, _ in rows[name]["figures"])
    for name in ("W1", "W2", "W3"):
        assert f"| {name} | base |" in p.stdout
    assert "| W4 | MB/s |" in p.stdout and "| W5 | packed tokens/s, 1 worker(s) |" in p.stdout


def test_synthetic_documents_tokenize_to_exact_lengths(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.pop(0)
    tok, data = run.build_data(tmp_path, vocab=300, doc_len=40, n_docs=3)
    lines = (tmp_path / "docs.jsonl").read_text(encoding="utf-8").splitlines()
    ids = tok.encode(json.loads(lines[0])["output"])
    assert len(ids) == 39 and min(ids) >= 3 and max(ids) < 300
    assert Path(data[0]["path"]).is_dir()


def test_run_py_profile_flag_reports_the_top_kernels(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "W1", "--tiny", "--variants", "profile",
                        "--out", str(tmp_path)], cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (row,) = json.loads((tmp_path / "run.json").read_text())["fm9g"]
    assert "error" not in row, row
    names = [k["name"] for k in row["kernels"]]
    assert 0 < len(names) <= 20 and any("mm" in n for n in names), names
    assert all(k["ms_per_step"] >= 0 for k in row["kernels"])
    trace = json.loads((tmp_path / "trace-W1-profile.json").read_text())  # the Chrome trace, kept
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])


def _run_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.pop(0)
    return run


def test_hf_baseline_is_the_shared_protocol_file_with_liger():
    """benchmarks/hf_baseline.py is ../shared/bench/hf_baseline.py below its 3-line header, and it
    takes the `:liger` flags run.py passes."""
    ours = (ROOT / "benchmarks" / "hf_baseline.py").read_text(encoding="utf-8")
    assert "liger=\"liger\" in flags" in ours and "apply_liger_kernel_to_qwen2" in ours
    shared = ROOT.parent / "shared" / "bench" / "hf_baseline.py"
    if shared.exists():  # beside the checkout on the development machine
        assert ours.split("\n", 3)[3] == shared.read_text(encoding="utf-8")


def test_every_hf_configuration_runs_liger_ones_alone_and_the_ratio_is_to_the_best(monkeypatch, tmp_path):
    """W2's baseline: the plain configurations in one process, each Liger one in a process of its
    own; without liger-kernel they are entries saying how to install it; the table divides by the
    fastest configuration that ran (a Liger one here), not by one that ran out of memory."""
    import importlib.util

    run = _run_module()
    calls = []
    speed = {"lora": 7000, "lora:nockpt": None, "lora:liger": 8000, "lora:nockpt:liger": 8233}

    def child(cmd, log, timeout):
        kinds = cmd[2:]
        calls.append(kinds)
        return [dict(kind=k, error="out of memory") if speed[k] is None else dict(kind=k, tokens_per_s=speed[k])
                for k in kinds], ""

    monkeypatch.setattr(run, "_run_child", child)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel"
                        else real_find_spec(name, *a))
    hf = run._hf_baseline("W2", tmp_path, 60.0)
    assert calls == [["lora", "lora:nockpt"], ["lora:liger"], ["lora:nockpt:liger"]]
    fm9g = [dict(workload="W2", variant="base", tokens_per_s=16466, mfu=None, peak_mem_GB=30.0, step_s=0.25)]
    text = run.table(fm9g, {"W2": hf})
    assert "| lora:nockpt:liger | 8,233 |" in text and "| 2.00× |" in text, text
    assert "| W2 | HF lora:nockpt | error: out of memory |" in text

    calls.clear()  # --hf picks configurations: a plain one alone still shares no process with a Liger one
    assert [h["kind"] for h in run._hf_baseline("W2", tmp_path, 60.0, ["lora:nockpt", "lora:nockpt:liger"])] == [
        "lora:nockpt", "lora:nockpt:liger"]
    assert calls == [["lora:nockpt"], ["lora:nockpt:liger"]]
    calls.clear()
    run._hf_baseline("W2", tmp_path, 60.0, ["lora:nockpt:liger"])
    assert calls == [["lora:nockpt:liger"]]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel"
                        else real_find_spec(name, *a))
    calls.clear()
    hf = run._hf_baseline("W2", tmp_path, 60.0)
    assert calls == [["lora", "lora:nockpt"]]
    assert [h["error"] for h in hf if h["kind"].endswith("liger")] == ["liger-kernel is not installed: pip install "
                                                                       "liger-kernel"] * 2


def test_the_fp8_variant_sets_train_config_fp8(tmp_path):
    run = _run_module()
    spec = dict(tiny=True, workload="W1", scale="", work=str(tmp_path), steps=2, warmup=1)
    mc, _ = run._shape(spec)
    for variant, want in (("fp8=tensorwise", "tensorwise"), ("fp8=rowwise", "rowwise"), ("base", False)):
        assert run.train_config(spec, mc, [], run.parse_variant(variant)).fp8 == want


def test_the_ckpt_flag_switches_checkpointing_either_way(tmp_path):
    run = _run_module()
    for workload, variant, want in (("W1", "base", False), ("W1", "ckpt", True), ("W3", "base", True),
                                    ("W3", "ckpt=0", False), ("W3", "ckpt=1", True), ("W3", "ckpt=0.5", 0.5)):
        spec = dict(tiny=True, workload=workload, scale="", work=str(tmp_path), steps=2, warmup=1)
        mc, _ = run._shape(spec)
        assert run.train_config(spec, mc, [], run.parse_variant(variant)).use_checkpoint == want, (workload, variant)
