import subprocess
import sys


def test_import_without_optional_packages():
    # `import fm9g` must not pull in bmtrain, flash-attn or CUDA.
    code = (
        "import sys, fm9g; "
        "assert 'bmtrain' not in sys.modules and 'flash_attn' not in sys.modules; "
        "print(fm9g.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"


def test_unknown_public_name_is_an_attribute_error():
    import fm9g
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fm9g.nope


def test_atomic_write_keeps_the_old_file_on_error_and_uses_normal_permissions(tmp_path):
    import os
    import stat

    import pytest

    from fm9g._io import atomic_file, atomic_write_text

    target = tmp_path / "config.json"
    atomic_write_text(target, "old\n")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind
