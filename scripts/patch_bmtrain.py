"""Patch an unpacked bmtrain 1.0.1 sdist so that it builds for one GPU architecture.

bmtrain's CMakeLists.txt names CUDA architectures in three places (``CMAKE_CUDA_ARCHITECTURES``,
``-gencode`` flags in ``CMAKE_CUDA_FLAGS`` including an extra sm_86 line, and
``set_target_properties(... CUDA_ARCHITECTURES ...)``); CUDA 13's nvcc rejects the sm_61..sm_80
it lists. This sets all three to the given architecture, and drops ``nvidia-nccl-cu11`` from the
package's requirements (installing it over torch's NCCL breaks ``import torch`` with
``undefined symbol ncclCommResume``). See docs/install.md.

Usage: ``python scripts/patch_bmtrain.py SRC_DIR --arch 90``
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_GENCODE = re.compile(r"\s*-gencode[= ]arch=compute_\w+,code=sm_\w+")
_ARCH_LIST = re.compile(r'(set\s*\(\s*CMAKE_CUDA_ARCHITECTURES\s+)"?[0-9;\s]+"?(\s*\))', re.IGNORECASE)
_TARGET_ARCH = re.compile(r'(set_target_properties\s*\([^)]*?CUDA_ARCHITECTURES\s+)"?[0-9;\s]+"?(\s*\))',
                          re.IGNORECASE | re.DOTALL)
_CUDA_FLAGS = re.compile(r'(set\s*\(\s*CMAKE_CUDA_FLAGS\s+"\$\{CMAKE_CUDA_FLAGS\})', re.IGNORECASE)
_NCCL_REQ = re.compile(r"""\s*["']nvidia-nccl-cu11[^"']*["']\s*,?""")


class PatchError(RuntimeError):
    """The file does not look like bmtrain 1.0.1's (nothing to patch where expected)."""


def patch_cmakelists(text: str, arch: str) -> str:
    """CMakeLists.txt text with every architecture set to ``arch`` (e.g. "90").

    Raises:
        PatchError: one of the three places is missing.
    """
    text, n_list = _ARCH_LIST.subn(rf'\g<1>"{arch}"\g<2>', text)
    text, n_target = _TARGET_ARCH.subn(rf'\g<1>"{arch}"\g<2>', text)
    text, n_gencode = _GENCODE.subn("", text)
    flag = f" -gencode=arch=compute_{arch},code=sm_{arch}"
    text, n_flags = _CUDA_FLAGS.subn(lambda m: m.group(1) + flag, text, count=1)
    missing = [what for what, n in (("set(CMAKE_CUDA_ARCHITECTURES ...)", n_list),
                                    ("set_target_properties(... CUDA_ARCHITECTURES ...)", n_target),
                                    ("-gencode flags", n_gencode),
                                    ('set(CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS} ...")', n_flags)) if n == 0]
    if missing:
        raise PatchError(f"CMakeLists.txt has no {', '.join(missing)}: is this the bmtrain 1.0.1 sdist?")
    return text


def drop_nccl_requirement(text: str) -> str:
    """setup.py / pyproject.toml text without the ``nvidia-nccl-cu11`` requirement."""
    return _NCCL_REQ.sub("", text)


def patch_tree(src: Path, arch: str) -> list[str]:
    """Patch the unpacked sdist at ``src`` in place.

    Returns:
        the patched architecture lines of CMakeLists.txt (for the log).
    Raises:
        PatchError: ``src`` is not a bmtrain source tree.
    """
    cmake = src / "CMakeLists.txt"
    if not cmake.is_file() or not (src / "setup.py").is_file():
        raise PatchError(f"{src} has no CMakeLists.txt / setup.py: pass the unpacked bmtrain-1.0.1 directory")
    if not re.fullmatch(r"\d{2,3}[a-z]?", arch):
        raise PatchError(f"--arch {arch!r}: expected a compute capability like 90 (H100/H200) or 80 (A100)")
    cmake.write_text(patch_cmakelists(cmake.read_text(), arch))
    for name in ("setup.py", "pyproject.toml"):
        path = src / name
        if path.is_file():
            path.write_text(drop_nccl_requirement(path.read_text()))
    return [line.strip() for line in cmake.read_text().splitlines()
            if "ARCHITECTURES" in line or "gencode" in line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the unpacked bmtrain-1.0.1 directory")
    parser.add_argument("--arch", required=True, help="compute capability without the dot, e.g. 90")
    args = parser.parse_args(argv)
    try:
        lines = patch_tree(args.src, args.arch)
    except PatchError as err:
        print(f"patch_bmtrain: {err}", file=sys.stderr)
        return 1
    print("patched CMakeLists.txt:")
    for line in lines:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
