#!/usr/bin/env bash
# One device call for issue 13 (speed): the GPU tests of the hot path, then benchmarks/run.py over
# the given workloads and variants, every run `Trainer(config).fit()` over a real index.
#
#   bash benchmarks/gpu_speed.sh "W1" "opt=adamw_master,opt=adamw_master+attn=cudnn_varlen" [--no-hf] ...
#   TESTS=0 bash benchmarks/gpu_speed.sh "W1 W2" base            # skip the GPU tests
#   TESTS_K="cuda_graphs or static_layout" bash benchmarks/gpu_speed.sh ...   # only these GPU tests
#   bash benchmarks/gpu_speed.sh W1 base,graphs ::: W2 base --no-hf          # run.py once per group
#
# Arguments: the workloads (one word, space-separated), the variants (comma-separated), then any
# further run.py flags; ":::" starts another such group (its own run.py call). Writes at most 8
# files to $OUT (the device tool's limit): machine.txt, pytest_gpu.log, run.json (a list, one entry
# per group) / run.md of the benchmark, logs.tgz with every child's log, and the profile flag's
# Chrome traces (trace-<run>.json.gz).
# Needs on the machine: torch (CUDA), transformers, peft, h5py, safetensors; wheels in .whl/
# (tensorboardX, orjson, gguf; torchao for fp8=..., liger-kernel for the HF baseline's Liger
# configurations) are installed into /tmp/site when one of them is missing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/runs/gpu_speed}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import tensorboardX, orjson, gguf, torchao, liger_kernel" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -n 2
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "$PY" -V
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ "${TESTS:-1}" != 0 ]; then
  timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} tests/test_attention.py \
    tests/test_model.py tests/test_optimizers.py tests/test_trainer.py tests/test_lora.py tests/test_fp8.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
fi
work=$(mktemp -d)
group=0
run_group() {  # workloads variants [run.py flags]
  local workloads=${1:-W1 W2} variants=${2:-base}
  shift 2 2>/dev/null || shift $#
  group=$((group + 1))
  # shellcheck disable=SC2086  # the workloads are words on purpose
  "$PY" benchmarks/run.py $workloads --variants "$variants" --out "$work/g$group" "$@" 2>&1 | tail -n 30
  cat "$work/g$group/run.md" >> "$work/run.md" 2>/dev/null
  echo >> "$work/run.md"
}
args=()
for a in "$@"; do
  if [ "$a" = ":::" ]; then run_group "${args[@]}"; args=(); else args+=("$a"); fi
done
run_group "${args[@]}"
"$PY" - "$work" <<'PYEOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
runs = [json.loads(p.read_text()) for p in sorted(work.glob("g*/run.json"))]
(work / "run.json").write_text(json.dumps(runs if len(runs) != 1 else runs[0], indent=1))
PYEOF
cp "$work/run.json" "$work/run.md" "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$work" --exclude='*.json' --exclude='*.md' . 2>/dev/null
for t in "$work"/g*/trace-*.json; do [ -f "$t" ] && gzip -c "$t" > "$OUT/$(basename "$t").gz"; done
[ -f "$OUT/run.json" ]  # the status: whether the benchmark wrote its table
