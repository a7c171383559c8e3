#!/usr/bin/env bash
# Build and install bmtrain 1.0.1 from its sdist for THIS machine's GPU and torch (docs/install.md).
#
#   bash scripts/install_bmtrain.sh [SDIST.tar.gz] [--arch 90]
#
# SDIST defaults to .whl/bmtrain-1.0.1.tar.gz (downloaded there when missing and the network
# allows). The CUDA architecture defaults to the local GPU's compute capability (read with torch).
# Steps: patch CMakeLists.txt's three architecture lists to that one architecture, point the
# build at torch's own NCCL (the nvidia/nccl package in site-packages), then
# `pip install --no-deps --no-build-isolation .` (never installs nvidia-nccl-cu11), and check
# that `import torch, bmtrain` works. Environment: PYTHON (default: python), BMTRAIN_CUDA_ARCH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
SDIST=""
ARCH="${BMTRAIN_CUDA_ARCH:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH="$2"; shift 2 ;;
    --arch=*) ARCH="${1#--arch=}"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) SDIST="$1"; shift ;;
  esac
done

fail() { echo "install_bmtrain: $*" >&2; exit 1; }
say() { echo "install_bmtrain: $*"; }

# 1. python, torch with CUDA
command -v "$PY" >/dev/null || fail "no '$PY' on PATH; set PYTHON=/path/to/python of the environment that has torch"
"$PY" -c "import torch" 2>/dev/null || fail "'$PY' cannot import torch: install torch for your CUDA first (docs/install.md, GPU install)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
  || fail "this torch is a CPU build ($("$PY" -c 'import torch; print(torch.__version__)')); bmtrain needs a CUDA build of torch"
for mod in setuptools pybind11; do
  "$PY" -c "import $mod" 2>/dev/null || fail "'$PY' has no $mod (needed to build without build isolation): $PY -m pip install $mod"
done
command -v cmake >/dev/null || "$PY" -c "import cmake" 2>/dev/null \
  || fail "no cmake: install it (apt-get install cmake, or $PY -m pip install cmake)"

# 2. architecture
if [ -z "$ARCH" ]; then
  ARCH="$("$PY" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null)" \
    || fail "cannot read the GPU's compute capability (no GPU visible?); pass --arch 90 (H100/H200), 80 (A100), 89 (L40S/4090)"
fi
say "CUDA architecture sm_$ARCH"

# 3. nvcc
if [ -z "${CUDACXX:-}" ]; then
  if command -v nvcc >/dev/null; then CUDACXX="$(command -v nvcc)"
  elif [ -x /usr/local/cuda/bin/nvcc ]; then CUDACXX=/usr/local/cuda/bin/nvcc
  else fail "no nvcc (CUDA toolkit) found: install the toolkit matching torch's CUDA $("$PY" -c 'import torch; print(torch.version.cuda)'), or set CUDACXX=/path/to/nvcc"
  fi
fi
export CUDACXX
say "nvcc: $CUDACXX ($("$CUDACXX" --version | tail -n 1))"

# 4. torch's NCCL (never a second NCCL from nvidia-nccl-cu11)
NCCL_DIR="$("$PY" -c "import nvidia.nccl as m, os; print(list(m.__path__)[0] if getattr(m, '__path__', None) else os.path.dirname(m.__file__))" 2>/dev/null)" \
  || fail "'$PY' has no nvidia.nccl package (torch's NCCL wheel, e.g. nvidia-nccl-cu12 / -cu13): reinstall torch from the PyTorch index for your CUDA"
[ -f "$NCCL_DIR/include/nccl.h" ] || fail "$NCCL_DIR/include/nccl.h is missing: the nvidia NCCL wheel has no headers; reinstall it (pip install --force-reinstall --no-deps nvidia-nccl-cuXX matching torch)"
NCCL_LIB="$NCCL_DIR/lib"
[ -f "$NCCL_LIB/libnccl.so.2" ] || [ -f "$NCCL_LIB/libnccl.so" ] || fail "no libnccl.so.2 in $NCCL_LIB"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bmtrain-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [ ! -e "$NCCL_LIB/libnccl.so" ]; then  # the wheel ships only the versioned name; give the linker both
  mkdir -p "$WORK/nccl-lib"
  ln -s "$NCCL_LIB/libnccl.so.2" "$WORK/nccl-lib/libnccl.so"
  ln -s "$NCCL_LIB/libnccl.so.2" "$WORK/nccl-lib/libnccl.so.2"
  NCCL_LIB="$WORK/nccl-lib"
fi
export NCCL_INCLUDE_DIR="$NCCL_DIR/include" NCCL_LIB_DIR="$NCCL_LIB"
unset NCCL_ROOT_DIR
say "NCCL: include $NCCL_INCLUDE_DIR, lib $NCCL_LIB_DIR"

# 5. the sdist
if [ -z "$SDIST" ]; then
  SDIST="$ROOT/.whl/bmtrain-1.0.1.tar.gz"
  if [ ! -f "$SDIST" ]; then
    say "no $SDIST: downloading it"
    mkdir -p "$ROOT/.whl"
    "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation bmtrain==1.0.1 -d "$ROOT/.whl" \
      || fail "could not download the bmtrain sdist (no network?): on a machine with network run
  pip download --no-deps --no-binary :all: --no-build-isolation bmtrain==1.0.1 -d .whl
and copy .whl/bmtrain-1.0.1.tar.gz here, or pass its path as the first argument"
  fi
fi
[ -f "$SDIST" ] || fail "no such sdist: $SDIST"
tar -xzf "$SDIST" -C "$WORK" || fail "cannot unpack $SDIST (a bmtrain-1.0.1.tar.gz is expected)"
SRC="$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'bmtrain-*' | head -n 1)"
[ -n "$SRC" ] || fail "$SDIST holds no bmtrain-* directory"

# 6. patch, build, install
"$PY" "$ROOT/scripts/patch_bmtrain.py" "$SRC" --arch "$ARCH" || fail "patching $SRC failed (see above)"
say "building (pip install --no-deps --no-build-isolation) ..."
(cd "$SRC" && CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$PY" -m pip install --no-deps --no-build-isolation --no-cache-dir -v .) \
  || fail "the build failed; the cmake / nvcc messages are above. Common causes: nvcc older than the GPU (sm_$ARCH unknown: update the CUDA toolkit), nvcc newer than torch's CUDA, or a missing C++ compiler (apt-get install g++)"

# 7. check
cd /
"$PY" -c "import torch, bmtrain, bmtrain.C; print('bmtrain', bmtrain.__file__, 'with torch', torch.__version__, 'CUDA', torch.version.cuda)" \
  || fail "bmtrain was installed but does not import next to torch (messages above). If 'import torch' itself fails with 'undefined symbol ncclCommResume', a second NCCL was installed: pip uninstall -y nvidia-nccl-cu11"
"$PY" -m pip show nvidia-nccl-cu11 >/dev/null 2>&1 \
  && echo "install_bmtrain: warning: nvidia-nccl-cu11 is installed; it can shadow torch's NCCL (pip uninstall -y nvidia-nccl-cu11)" >&2
say "done"
