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
