"""W6: time and peak memory of `hf_to_bmt` / `bmt_to_hf` on a full-size random checkpoint (CPU).

Run through the harness: ``python benchmarks/run.py W6`` (``--tiny``: the ``tiny`` preset).
Steps (each conversion runs in a fresh subprocess so its peak RSS is its own):
  1. write a random Hugging Face checkpoint of the fm9g-7b shape under the run's work folder (bf16
     safetensors shards, streamed, so this step itself needs little memory); not timed;
  2. `hf_to_bmt(hf_dir, 7b.pt)`;
  3. `bmt_to_hf(7b.pt, out, format="native")`.
Peak RSS is VmHWM of the subprocess (anonymous + file-backed pages). Memory-mapped checkpoint pages
count as file-backed RSS: the kernel can drop them at any time, so the anonymous peak is also
reported. The work folder is deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _measure(fn) -> dict[str, float]:
    """Run fn() and report wall time, VmHWM and the peak anonymous RSS (sampled every 20 ms)."""
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, _status().get("RssAnon", 0))
            time.sleep(0.02)

    base = _status()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    end = _status()
    return {"seconds": seconds, "peak_rss": end["VmHWM"], "peak_anon": max(peak_anon, end.get("RssAnon", 0)),
            "baseline_rss": base["VmRSS"]}


def _child(args: argparse.Namespace) -> None:
    """One conversion in this process (the subprocess of `_run_child`); prints its measurements."""
    import torch

    from fm9g.convert.hf import bmt_to_hf, hf_to_bmt

    torch.set_num_threads(os.cpu_count() or 1)
    if args.child == "hf2bmt":
        res = _measure(lambda: hf_to_bmt(args.src, args.dst))
    else:
        res = _measure(lambda: bmt_to_hf(args.src, args.dst, format=args.format, overwrite=True))
    print("RESULT " + json.dumps(res))


def make_random_hf(out: Path, preset: str, layers: int | None) -> tuple[int, dict]:
    """A random bf16 HF checkpoint of the preset's shape (4.5 GB shards). Returns (bytes, config)."""
    import torch

    from fm9g.convert.files import TensorPlan, save_safetensors_sharded
    from fm9g.convert.hf import expected_bmt_shapes
    from fm9g.convert.hf_config import hf_config_from_fm9g
    from fm9g.convert.keys import bmt_to_hf_key
    from fm9g.models.config import FM9GConfig

    cfg = FM9GConfig.from_name(preset, **({"num_layers": layers} if layers else {}))
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return lambda: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    plans = [
        TensorPlan(name=bmt_to_hf_key(k), shape=s, dtype=torch.bfloat16, make=rand(s))
        for k, s in expected_bmt_shapes(cfg).items()
    ]
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors_sharded(out, plans, max_shard_size=int(4.5e9))
    # the original FM9G HF layout (model_type fm9g, muP fields kept, weights as trained)
    hf_cfg = hf_config_from_fm9g(cfg, format="fm9g", dtype=torch.bfloat16)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return sum(p.nbytes for p in plans), {"preset": preset, "num_layers": cfg.num_layers,
                                          "params": sum(math.prod(p.shape) for p in plans)}


def _run_child(*argv: str) -> dict:
    """Run one conversion in a fresh interpreter; returns what it measured."""
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def measure(work: Path, tiny: bool = False, preset: str = "fm9g-7b") -> dict[str, Any]:
    """Write the random checkpoint under ``work``, convert it both ways, and return the W6 figures
    (``figures``: name, value, goal)."""
    preset = "tiny" if tiny else preset
    try:
        nbytes, info = make_random_hf(work / "hf", preset, None)
        os.sync()
        h2b = _run_child("--child", "hf2bmt", "--src", str(work / "hf"), "--dst", str(work / "model.pt"))
        os.sync()
        b2h = _run_child("--child", "bmt2hf", "--src", str(work / "model.pt"), "--dst", str(work / "out"),
                         "--format", "native")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = []
    for name, r in (("hf_to_bmt", h2b), ("bmt_to_hf native", b2h)):
        figures += [(f"{name} seconds", round(r["seconds"], 1), "< 120"),
                    (f"{name} peak RSS / checkpoint", round(r["peak_rss"] / nbytes, 2), "< 1.3"),
                    (f"{name} peak anonymous RSS (GB)", round(r["peak_anon"] / 1e9, 2), "–")]
    return {"figures": figures, "preset": preset, "checkpoint_GB": round(nbytes / 1e9, 2), **info}


if __name__ == "__main__":  # the conversion subprocess of _run_child
    ap = argparse.ArgumentParser(description="one conversion of W6 (run by measure)")
    ap.add_argument("--child", choices=["hf2bmt", "bmt2hf"], required=True)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--format", default="native")
    _child(ap.parse_args())
