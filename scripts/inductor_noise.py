"""A neighbour that keeps compiling with torch inductor in the DEFAULT cache folder.

Used to show that the test suite is hermetic (tests/conftest.py gives each session its own
inductor and Triton caches): run this in one shell and the compile tests in another::

    .venv/bin/python scripts/inductor_noise.py --seconds 900 --wipe &
    .venv/bin/python -m pytest -q tests/test_optimizers.py -k compiled

Each round compiles a new small function (a fresh constant, so inductor generates and builds new
C++), in ``/tmp/torchinductor_<user>`` whatever the environment says. ``--wipe`` also deletes that
folder's precompiled headers and compiled kernels between rounds, as a machine's tmp cleaner or a
crashing neighbour would. Prints one line per 20 rounds and the total at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="how long to keep compiling")
    ap.add_argument("--wipe", action="store_true", help="delete the default cache's contents between rounds")
    args = ap.parse_args()
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        os.environ.pop(var, None)  # the default folder, as any other program on the machine uses it
    import torch
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    folder = default_cache_dir()
    assert cache_dir() == os.path.abspath(folder), (cache_dir(), folder)
    end, rounds, failures = time.monotonic() + args.seconds, 0, 0
    x = torch.randn(64, 64)
    while time.monotonic() < end:
        scale = 1.0 + rounds * 1e-3  # a new constant: new generated code, a new C++ build

        def f(t: torch.Tensor, s: float = scale) -> torch.Tensor:
            return (t * s).sin().cumsum(0).relu() + t.mean(1, keepdim=True)

        torch._dynamo.reset()
        try:
            torch.compile(f, dynamic=False)(x)
        except Exception as err:  # noqa: BLE001 - its own wipe can race its next build: keep going
            failures += 1
            if failures <= 3:
                print(f"a compile failed ({type(err).__name__}); going on", flush=True)
        rounds += 1
        if args.wipe:
            for sub in ("precompiled_headers", "cpp_prefix"):
                shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)
        if rounds % 20 == 0:
            print(f"{rounds} compiles in {folder}", flush=True)
    print(f"done: {rounds} compiles in {folder} ({failures} failed)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
