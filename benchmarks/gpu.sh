#!/usr/bin/env bash
# Variants (a) plain onnxruntime, (b) `analyzer run --stats main`, (c) `--stats full` on one GPU with
# the CUDA execution provider (IO binding: only the reduction outputs cross to the host), for
# stories260K and SmolLM2-135M; about 5 minutes. Needs onnxruntime-gpu in place of onnxruntime:
#   pip uninstall -y onnxruntime && pip install onnxruntime-gpu
# and SmolLM2's export at $MAXACT_MODELS/smollm2-135m/model.onnx (README, "Real use").
# Usage: benchmarks/gpu.sh [SAMPLES (400)] [REPEATS (2)]
set -euo pipefail
cd "$(dirname "$0")/.."
samples=${1:-400}
repeats=${2:-2}
python -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else
  'onnxruntime has no CUDAExecutionProvider: pip uninstall -y onnxruntime && pip install onnxruntime-gpu')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for model in stories260k smollm2; do
    python benchmarks/run.py --model "$model" --provider cuda --variants a,b,c --samples "$samples" \
        --repeats "$repeats" --json "gpu-$model.json"
done
