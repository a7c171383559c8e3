"""W4: `build_index` throughput and peak memory on a large generated jsonl (CPU, no tokenizer).

Run through the harness: ``python benchmarks/run.py W4`` (``--tiny``: 5 MB, one worker).
Generates about 1 GB of jsonl (half Chinese, half English instruction records, 0.2-3 KB a line),
warms the page cache, builds the index with 2 workers and reports MB/s plus the peak RSS of the
whole process tree (this process + the validating workers, sampled every 20 ms from /proc).
Everything lives under the run's own work folder, deleted afterwards.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

ZH = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处府"
EN = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
      "they you were her she there one all we can has their been if more when will would who so no model data").split()


def generate(path: Path, size: int, seed: int = 0) -> None:
    """Write about ``size`` bytes of valid jsonl: a pool of 4096 random lines sampled with replacement."""
    r = random.Random(seed)
    pool = []
    for _ in range(4096):
        if r.random() < 0.5:
            rec = {"input": "".join(r.choices(ZH, k=r.randint(0, 200))), "output": "".join(r.choices(ZH, k=r.randint(50, 900)))}
        else:
            rec = {"input": " ".join(r.choices(EN, k=r.randint(0, 100))), "output": " ".join(r.choices(EN, k=r.randint(50, 600)))}
        pool.append((json.dumps(rec, ensure_ascii=False) + "\n").encode())
    written = 0
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        while written < size:
            chunk = b"".join(r.choices(pool, k=2048))
            f.write(chunk)
            written += len(chunk)
    os.replace(tmp, path)


def _tree_rss_kb(pid: int) -> int:
    """RSS of ``pid`` and all its descendants, in KiB (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def _peak_tree_rss_during(fn) -> tuple[Any, int, int]:
    """Run ``fn()``; returns (its result, baseline and peak RSS of this process tree in KiB)."""
    base_rss = _tree_rss_kb(os.getpid())
    peak = [base_rss]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(os.getpid()))
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        return fn(), base_rss, peak[0]
    finally:
        stop.set()
        th.join()


def measure(work: Path, tiny: bool = False, size_gb: float = 1.0, workers: int = 2) -> dict[str, Any]:
    """Generate the jsonl under ``work``, index it, and return the W4 figures (``figures``: name,
    value, goal) with the raw measurements."""
    from fm9g.data.indexed import IndexedDataset, build_index

    size_gb, workers = (0.005, 1) if tiny else (size_gb, workers)
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "bench.jsonl", work / "index"
    try:
        generate(src, int(size_gb * 1e9))
        with open(src, "rb") as f:  # warm the page cache: the figure measures build_index, not the disk
            while f.read(64 << 20):
                pass
        t0 = time.perf_counter()
        meta, base_rss, peak = _peak_tree_rss_during(
            lambda: build_index(src, out, language="zh", overwrite=True, num_workers=workers))
        dt = time.perf_counter() - t0
        nbytes = src.stat().st_size
        ds = IndexedDataset(out)
        assert len(ds) == meta["nlines"] and ds.nbytes == nbytes
        ds.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb_s = round(nbytes / 1e6 / dt, 1)
    return {"figures": [("MB/s", mb_s, "≥ 200"), ("peak RSS of the process tree (MB)", round(peak / 1024, 1), "< 500")],
            "input_bytes": nbytes, "lines": meta["nlines"], "workers": workers, "seconds": round(dt, 2),
            "baseline_rss_MB": round(base_rss / 1024, 1), "load_avg_1min": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count()}
