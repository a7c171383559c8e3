"""W6: time and peak memory of `hf_to_bmt` / `bmt_to_hf` on a full-size random checkpoint (CPU).

    python benchmarks/convert_bench.py --preset fm9g-7b --workdir /tmp/fm9g_convert_bench
    python benchmarks/convert_bench.py --preset fm9g-7b --layers 4      # a smaller slice, same widths

Steps (each conversion runs in a fresh subprocess so its peak RSS is its own):
  1. write a random Hugging Face checkpoint of the preset's shape (bf16 safetensors shards, streamed,
     so this step itself needs little memory); not timed as part of W6;
  2. `hf_to_bmt(hf_dir, 7b.pt)`;
  3. `bmt_to_hf(7b.pt, out, format="native")` (and `--formats native fm9g` for both).
Peak RSS is VmHWM of the subprocess (anonymous + file-backed pages). Memory-mapped checkpoint pages
count as file-backed RSS: the kernel can drop them at any time, so the anonymous peak is also
reported. The working directory is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

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

    from fm9g.convert.hf import _TensorPlan, expected_bmt_shapes, hf_config_from_fm9g, save_safetensors_sharded
    from fm9g.convert.keys import bmt_to_hf_key
    from fm9g.models.config import FM9GConfig

    cfg = FM9GConfig.from_name(preset, **({"num_layers": layers} if layers else {}))
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return lambda: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    plans = [
        _TensorPlan(name=bmt_to_hf_key(k), shape=s, dtype=torch.bfloat16, make=rand(s))
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
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fm9g-7b")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (smaller runs)")
    ap.add_argument("--workdir", default="/tmp/fm9g_convert_bench")
    ap.add_argument("--formats", nargs="+", default=["native"], choices=["native", "fm9g"])
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results_convert.md"))
    ap.add_argument("--child", choices=["hf2bmt", "bmt2hf"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    ap.add_argument("--format", default="native", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    import torch

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    free = shutil.disk_usage(work.parent).free
    print(f"free disk at {work.parent}: {free / 1e9:.1f} GB")
    try:
        t0 = time.perf_counter()
        nbytes, info = make_random_hf(work / "hf", args.preset, args.layers)
        print(f"random checkpoint: {nbytes / 1e9:.2f} GB, {info['params'] / 1e9:.2f} B params, "
              f"written in {time.perf_counter() - t0:.1f}s")
        os.sync()
        rows = []
        r = _run_child("--child", "hf2bmt", "--src", str(work / "hf"), "--dst", str(work / "model.pt"))
        rows.append(("hf_to_bmt (HF safetensors shards → .pt)", r))
        print("hf_to_bmt", r)
        for fmt in args.formats:
            os.sync()
            r = _run_child("--child", "bmt2hf", "--src", str(work / "model.pt"), "--dst", str(work / f"out_{fmt}"),
                           "--format", fmt)
            rows.append((f"bmt_to_hf format={fmt} (.pt → HF safetensors shards)", r))
            print("bmt_to_hf", fmt, r)
    finally:
        if not args.keep and work.exists():
            shutil.rmtree(work)

    cmd = "python benchmarks/convert_bench.py --preset " + args.preset + (f" --layers {args.layers}" if args.layers else "")
    if args.formats != ["native"]:
        cmd += " --formats " + " ".join(args.formats)
    lines = [
        f"### {args.preset}{f' ({args.layers} layers)' if args.layers else ''}: {info['params'] / 1e9:.2f} B params, "
        f"{nbytes / 1e9:.2f} GB bf16",
        "",
        f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, CPU ({os.cpu_count()} cores, shared), "
        f"torch {torch.__version__}, Python {platform.python_version()}",
        "",
        "| step | time (s) | peak RSS (GB) | peak RSS / ckpt | peak anonymous RSS (GB) | goal |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        ok = r["seconds"] < 120 and r["peak_rss"] < 1.3 * nbytes
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | {r['peak_rss'] / nbytes:.2f}× | "
            f"{r['peak_anon'] / 1e9:.2f} | {'met' if ok else 'NOT met'} (< 120 s, < 1.3×) |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    results = Path(args.results)
    header = "# Checkpoint conversion benchmarks (W6)\n\n" if not results.exists() else ""
    with open(results, "a", encoding="utf-8") as fh:
        fh.write(header + text + "\n")


if __name__ == "__main__":
    main()
