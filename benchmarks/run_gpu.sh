#!/usr/bin/env bash
# The GPU table in one command, for a machine with a CUDA jax (e.g. the device
# tool's): the whole suite with --gpu (absolute times, no PyTorch CPU rows),
# capped at CAP seconds (default 480) so that a rerun fits in a 15-minute lease.
# Writes gpu.md, gpu.json and gpu.png to OUT (default: benchmarks/gpu-results).
#   benchmarks/run_gpu.sh                 # or: CAP=300 OUT=$OUT benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-results}
CAP=${CAP:-480}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
"$PYTHON" -c "import jax; assert jax.devices()[0].platform == 'gpu', jax.devices()" ||
  { echo "run_gpu.sh: jax sees no GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu-name.txt" || true
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout "$CAP" "$PYTHON" benchmarks/bench_suite.py --gpu \
  --json "$OUT/gpu.json" --chart "$OUT/gpu.png" "$@" | tee "$OUT/gpu.md"
