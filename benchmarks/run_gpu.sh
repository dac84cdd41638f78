#!/usr/bin/env bash
# The GPU table, for a machine with a CUDA jax (e.g. the device tool's). Two
# parts, so that each fits one call of a 15-minute lease (the first lease, of
# 2026-12-04, needed ~8 minutes for the float32 rows alone, mostly compiling):
#   PART=f32  operator-mode against kernel-mode spectral norm (bench_operator.py),
#             then the float32 train steps of every model (gpu-f32.json)
#   PART=rest what the discriminator's float32 steps are made of (dump_steps.py:
#             op counts, memory, XLA's buffer assignment, in OUT/steps and
#             OUT/xla), then sigma against the SVD, compile time against n, and the
#             bfloat16 train steps (gpu-rest.json)
#   PART=all  both, in one process (gpu.json)
# Each part runs the suite with --gpu (absolute times, no PyTorch CPU rows)
# capped at CAP seconds (default 400). The suite saves its JSON after every
# model, so a capped part keeps what it timed. Then, anywhere:
#   python benchmarks/bench_suite.py --from-json gpu-f32.json,gpu-rest.json --chart gpu.png
# Files go to OUT (default benchmarks/gpu-results); extra arguments go to bench_suite.py.
#   PART=f32 OUT=$OUT benchmarks/run_gpu.sh --model-budget 20
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-results}
CAP=${CAP:-400}
PART=${PART:-all}
PYTHON=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
case $PART in
  f32) args=(--no-bf16 --steps-only) name=gpu-f32 ;;
  rest) args=(--no-f32) name=gpu-rest ;;
  all) args=() name=gpu ;;
  *) echo "run_gpu.sh: PART is f32, rest or all" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
"$PYTHON" -c "import jax; assert jax.devices()[0].platform == 'gpu', jax.devices()" ||
  { echo "run_gpu.sh: jax sees no GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu-name.txt" || true
if [[ $PART != rest ]]; then
  timeout 120 "$PYTHON" benchmarks/bench_operator.py --rounds 30 --steps 20 | tee "$OUT/operator.md" ||
    echo "run_gpu.sh: bench_operator.py failed or ran past 120 s" >&2
fi
if [[ $PART == rest ]]; then
  XLA_FLAGS="--xla_dump_to=$OUT/xla --xla_dump_hlo_module_re=jit_disc.*" timeout 120 \
    "$PYTHON" benchmarks/dump_steps.py --model disc --out "$OUT/steps" | tee "$OUT/steps.md" ||
    echo "run_gpu.sh: dump_steps.py failed or ran past 120 s" >&2
  # Keep XLA's buffer assignment and memory report of each step, not its pass-by-pass dumps.
  find "$OUT/xla" -type f ! -name '*buffer-assignment.txt' ! -name '*memory-usage-report.txt' \
    -delete 2>/dev/null || true
fi
timeout "$CAP" "$PYTHON" benchmarks/bench_suite.py --gpu "${args[@]}" \
  --json "$OUT/$name.json" --chart "$OUT/$name.png" "$@" | tee "$OUT/$name.md"
