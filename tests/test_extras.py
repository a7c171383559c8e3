"""The GPU extras of pyproject.toml install from wheels that exist for the torch fm9g supports.

The facts come from PyPI, checked by hand (no network in this test): `PYPI_WHEELS` records, for
each package a GPU extra names, the version looked at and what PyPI holds for it, as found on
2026-12-07 with

    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 -d /tmp/w "<package>==<version>"

(and ``pip index versions``). Re-check them and update the table when an extra changes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CHECKED_ON = "2026-12-07"
#: the torch of the GPU machines the extras are for (BENCHMARKS.md: torch 2.11.0+cu130, Python 3.12)
SUPPORTED_TORCH = Version("2.11.0")
#: the GPU extras: every one of them must install from wheels
GPU_EXTRAS = ("gpu", "fa4", "ampere", "fp8")

#: package -> (version checked, wheel tags on PyPI ([] = sdist only), lowest torch it runs with)
#: "py3-none-any" wheels hold no compiled torch code (flash-attn-4's kernels are Python, compiled
#: by NVIDIA's CuTe DSL on first use), so they fit any torch; torchao's abi3 wheel loads its C++
#: extensions from torch 2.11 on (its own check at import).
PYPI_WHEELS: dict[str, tuple[str, list[str], str | None]] = {
    "flash-attn-4": ("4.0.0b40", ["py3-none-any"], None),
    # flash-attn-4's dependencies with compiled parts, checked the same way (all wheels):
    "nvidia-cutlass-dsl": ("4.8.1", ["py3-none-any"], None),
    "nvidia-cutlass-dsl-libs-base": ("4.8.1", ["cp312-cp312-manylinux_2_28_x86_64"], None),
    "nvidia-cutlass-dsl-libs-cu12": ("4.8.1", ["cp312-cp312-manylinux_2_28_x86_64"], None),
    "quack-kernels": ("0.6.5", ["py3-none-any"], None),
    "apache-tvm-ffi": ("0.1.15.post2", ["cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64"], None),
    "torch-c-dlpack-ext": ("0.1.5", ["cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64"], None),
    "torchao": ("0.18.0", ["cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64"], "2.11.0"),
    # flash-attn 2: no wheel on PyPI for any version (pip builds the sdist with nvcc, for hours)
    "flash-attn": ("2.8.3.post2", [], None),
}
#: extras allowed to name an sdist-only package (documented as building from source)
BUILDS_FROM_SOURCE = {"ampere"}


def _extras() -> dict[str, list[Requirement]]:
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml with tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in extras.items()}


def _torch_ok(min_torch: str | None) -> bool:
    return min_torch is None or Version(min_torch) <= SUPPORTED_TORCH


@pytest.mark.parametrize("extra", GPU_EXTRAS, ids=[f"extra_{e}" for e in GPU_EXTRAS])  # an id "gpu" is the gpu marker's keyword
def test_every_gpu_extra_names_packages_with_wheels_for_the_supported_torch(extra):
    reqs = _extras()[extra]
    assert reqs, f"the extra {extra!r} is empty"
    for req in reqs:
        assert req.name in PYPI_WHEELS, (f"{extra}: {req.name} was not checked on PyPI (the table is of "
                                         f"{CHECKED_ON}); check its wheels (module docstring) and add it to PYPI_WHEELS")
        version, wheels, min_torch = PYPI_WHEELS[req.name]
        assert req.specifier.contains(version, prereleases=True), (
            f"{extra}: {req} does not admit {version}, the version whose wheels were checked")
        if extra in BUILDS_FROM_SOURCE:
            continue
        assert wheels, f"{extra}: {req.name} {version} has no wheel on PyPI (sdist only)"
        assert _torch_ok(min_torch), f"{extra}: {req.name} {version} needs torch >= {min_torch}"


def test_the_gpu_extra_is_flash_attn_4_and_not_flash_attn_2():
    extras = _extras()
    names = {r.name for r in extras["gpu"]}
    assert "flash-attn-4" in names and "flash-attn" not in names
    assert [str(r) for r in extras["fa4"]] == [str(r) for r in extras["gpu"]]  # the older name, same packages
    assert {r.name for r in extras["ampere"]} == {"flash-attn"}


def test_only_an_extra_that_says_so_builds_from_source():
    """An sdist-only package appears in an extra documented as building from source, nowhere else,
    and docs/install.md says so."""
    sdist_only = {name for name, (_, wheels, _) in PYPI_WHEELS.items() if not wheels}
    for extra, reqs in _extras().items():
        if extra not in BUILDS_FROM_SOURCE:
            assert not sdist_only & {r.name for r in reqs}, f"{extra} names an sdist-only package"
    install = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    assert '".[ampere]"' in install and "from source" in install and '".[fp8]"' in install and '".[gpu]"' in install


def test_the_flash_attn_4_dependencies_were_checked_too():
    """flash-attn-4's own requirements with compiled parts are in the table (so `pip install
    'fm9g[gpu]'` builds nothing); the names as its 4.0.0b40 metadata lists them."""
    needed = {"nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi", "torch-c-dlpack-ext"}
    assert needed <= set(PYPI_WHEELS)
    assert all(PYPI_WHEELS[n][1] for n in needed)
