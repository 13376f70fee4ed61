#!/usr/bin/env bash
# Issue 16's GPU figures in a few minutes, on a machine whose jax sees a GPU:
#   (1) the step-overhead table with its millisecond accounting (LeNet-300-100 and ViT-tiny),
#   (2) integer / float forward per CLI image model at 8x8, 28x28 and 32x32,
#   (3) GPT-tiny training throughput.
# Usage (from the repository root): bash benchmarks/gpu.sh [OUT_DIR]   (default: $OUT or /tmp)
# Everything is printed; the JSON goes to OUT_DIR. Nothing is downloaded: jax with its CUDA
# plugin and this package's dependencies must be installed already.
set -euo pipefail
out="${1:-${OUT:-/tmp}}"
mkdir -p "$out"
python=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "benchmarks/gpu.sh: jax sees no GPU here ($("$python" -c 'import jax; print(jax.devices())'))" >&2
  exit 2
fi
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv || true
echo "== (1) step overhead and accounting"
"$python" benchmarks/step.py --rounds 20 --models lenet300100,vit_tiny --batches 32 --out "$out"
echo "== (2) integer inference"
"$python" benchmarks/intinfer.py --rounds 10 --out "$out/intinfer.json"
echo "== (3) GPT-tiny training throughput"
"$python" benchmarks/lm_throughput.py --batches 12,64,256 --out "$out/lm_throughput.json"
