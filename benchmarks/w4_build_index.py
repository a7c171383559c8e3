"""W4: `build_index` throughput and peak memory on a large generated jsonl (CPU, no tokenizer).

Usage::

    python benchmarks/build_index_bench.py --size-gb 1 --workers 2 [--keep] [--tmp /tmp/fm9g_bench]

Generates ``--size-gb`` GB of jsonl (half Chinese, half English instruction records, 0.2-3 KB a
line) unless it exists, builds the index, and prints MB/s plus the peak RSS of the whole process
tree (this process + the validating workers, sampled every 20 ms from /proc). The generated file
and the index are deleted afterwards unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--language", default="zh")
    ap.add_argument("--tmp", default="/tmp/fm9g_build_index_bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated jsonl and the index")
    ap.add_argument("--no-orjson", action="store_true", help="validate with the standard library json (the fallback)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fm9g.data import indexed
    from fm9g.data.indexed import IndexedDataset, build_index

    if args.no_orjson:
        indexed._orjson = None  # forked workers inherit this

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    src, out = tmp / "bench.jsonl", tmp / "index"
    size = int(args.size_gb * 1e9)
    if not src.exists() or src.stat().st_size < size:
        t = time.perf_counter()
        generate(src, size)
        print(f"generated {src.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    # warm the page cache so the figure measures build_index, not the disk
    with open(src, "rb") as f:
        while f.read(64 << 20):
            pass

    base_rss = _tree_rss_kb(os.getpid())
    peak = [base_rss]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(os.getpid()))
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.perf_counter()
    cpu0 = os.times()
    meta = build_index(src, out, language=args.language, overwrite=True, num_workers=args.workers)
    dt = time.perf_counter() - t0
    cpu1 = os.times()
    stop.set()
    th.join()
    nbytes = src.stat().st_size
    ds = IndexedDataset(out)
    assert len(ds) == meta["nlines"] and ds.nbytes == nbytes
    ds.close()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system) + (cpu1.children_user - cpu0.children_user) + (
        cpu1.children_system - cpu0.children_system
    )
    result = {
        "input_bytes": nbytes,
        "lines": meta["nlines"],
        "workers": args.workers,
        "seconds": round(dt, 2),
        "MB_per_s": round(nbytes / 1e6 / dt, 1),
        "cpu_seconds": round(cpu, 1),
        "peak_tree_rss_MB": round(peak[0] / 1024, 1),
        "baseline_rss_MB": round(base_rss / 1024, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "json": "orjson" if indexed._orjson is not None else "stdlib",
    }
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
