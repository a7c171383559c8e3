"""The test session's own rules (tests/conftest.py): private compile caches, and the markers of
optional packages (``bmtrain``, ``fa4``) that select their tests and fail loudly without them."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compile_caches_are_private_to_the_session_and_reach_subprocesses():
    """inductor and Triton write under this session's own folder, not the shared default
    /tmp/torchinductor_<user>: the caches, and the precompiled C++ headers inductor keeps in the
    temporary folder's default cache whatever its cache setting says; a subprocess a test starts
    inherits all of it."""
    from torch._inductor import codecache
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    COMPILE_CACHE = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent
    assert COMPILE_CACHE.name.startswith("fm9g-tests-compile-")
    assert Path(tempfile.gettempdir()) == COMPILE_CACHE / "tmp" == Path(os.environ["TMPDIR"])
    assert Path(cache_dir()).parent == COMPILE_CACHE
    assert Path(default_cache_dir()).parent == COMPILE_CACHE / "tmp"
    assert Path(codecache._HEADER_DIR).is_relative_to(COMPILE_CACHE), codecache._HEADER_DIR
    assert Path(os.environ["TRITON_CACHE_DIR"]).parent == COMPILE_CACHE
    probe = ("from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir; "
             "print(cache_dir()); print(default_cache_dir())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    own, default = out.stdout.split()
    assert Path(own).parent == COMPILE_CACHE and Path(default).parent == COMPILE_CACHE / "tmp"


_MARKED = '''
import pytest

@pytest.mark.bmtrain
def test_needs_bmtrain():
    pass

@pytest.mark.fa4
def test_needs_fa4():
    pass

def test_core():
    pass
'''


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-W", "ignore", *args,
                           str(folder)], cwd=folder, capture_output=True, text=True, timeout=300)


def test_optional_package_tests_run_only_under_their_marker_and_fail_without_the_package(tmp_path):
    """`pytest -m gpu`'s rule on a small suite: the bmtrain / fa4 tests are deselected unless
    ``-m`` names their marker; named, they fail (with the install command) where the package is missing."""
    (tmp_path / "conftest.py").write_text(f"exec(open({str(ROOT / 'tests' / 'conftest.py')!r}).read())\n")
    (tmp_path / "test_marked.py").write_text(textwrap.dedent(_MARKED))
    plain = _pytest(tmp_path)
    assert "1 passed, 2 deselected" in plain.stdout, plain.stdout
    for marker, module, install in (("bmtrain", "bmtrain", "scripts/install_bmtrain.sh"),
                                    ("fa4", "flash_attn.cute.interface", "fm9g[gpu]")):
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, timeout=120)
        out = _pytest(tmp_path, "-m", marker)
        if probe.returncode == 0:  # installed here: the test runs
            assert "1 passed, 2 deselected" in out.stdout, out.stdout
        else:
            assert out.returncode == 1 and "1 failed, 2 deselected" in out.stdout, out.stdout
            assert f"this test needs {marker}" in out.stdout and install in out.stdout, out.stdout
