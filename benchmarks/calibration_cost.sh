#!/bin/bash
# maxact's calibration against onnxruntime's MinMax, back to back (issue 14's cost item); run by hand:
#   bash benchmarks/calibration_cost.sh MODEL.onnx [PASSAGES=8] [ROUNDS=2]
# Each step is its own process under /usr/bin/time (wall s, peak RSS KiB), in this order per round:
# analyzer run on an empty set-up cache (a first run), the same again (a cache hit), both again with
# --batch-size 1 (one passage per run, as onnxruntime's reader below feeds them), onnxruntime's
# MinMax calibrator alone, onnxruntime's whole quantize_static MinMax, analyzer quantize --policy maxact.
set -euo pipefail
MODEL=$(realpath "$1"); N=${2:-8}; ROUNDS=${3:-2}
REPO=$(cd "$(dirname "$0")/.." && pwd); PY=${PYTHON:-python}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
step() {
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/log" 2>&1 || { tail -3 "$WORK/log"; exit 1; }
  read -r wall kib < <(tail -1 "$WORK/time")
  printf '%-32s %7.1f s %7.0f MiB  load %s\n' "$label" "$wall" "$((kib / 1024))" "$(cut -d' ' -f1 /proc/loadavg)"
}
for r in $(seq "$ROUNDS"); do
  export MAXACT_CACHE_DIR="$WORK/cache-$r"
  run=("$PY" -m maxact.cli run "$MODEL" --samples "$N" --tensors quantizable --tensor-ops MatMul --out "$WORK/cal.h5"
       --force --no-progress)
  ort=("$PY" "$REPO/benchmarks/int8_table.py" "$MODEL" --calibrate 0 --evaluate 0 --ort-child "$WORK/cal.h5")
  step "analyzer run (first run)" "${run[@]}"
  step "analyzer run (repeated)" "${run[@]}"
  export MAXACT_CACHE_DIR="$WORK/cache-$r-batch1"
  step "analyzer run -b 1 (first run)" "${run[@]}" --batch-size 1
  step "analyzer run -b 1 (repeated)" "${run[@]}" --batch-size 1
  step "onnxruntime calibrator alone" "${ort[@]}" "$WORK/ort.json" MinMaxCalibration nopad
  step "onnxruntime quantize_static" "${ort[@]}" "$WORK/ort.onnx" MinMax nopad
  step "analyzer quantize --policy maxact" "$PY" -m maxact.cli quantize "$MODEL" "$WORK/cal.h5" --out "$WORK/q.onnx" \
    --policy maxact --force
done
