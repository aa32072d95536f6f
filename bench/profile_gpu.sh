#!/usr/bin/env bash
# One device call (one GPU): where the dMoE layer's time goes outside the GEMMs.
# 1. moe_bench --phases: the scatter forward step by step (host timers between device syncs);
# 2. ncu (kernel durations only, clocks left alone) over one warm-up + one forward+backward;
# 3. moe_bench --check at a small T with each expert-GEMM library.
# Expects the carried .dev/bin/moe_bench.xz (release, --features cuda). Knobs: GROUPED_GEMM, TS,
# PROFILE_T, CHECK_T, CHECK_EXTRA (e.g. "--d 1024 --ffn 3584"), NCU=0 to skip the profiler, CHECK=0 to skip the
# check. Logs under $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/profile_gpu.log") 2>&1
source bench/moe_bench_env.sh
GG=${GROUPED_GEMM:-cubecl,cublas}

echo "=== phases of the scatter forward"
timeout ${PHASES_TIMEOUT:-150} /tmp/moe_bench --backend cuda --phases --tokens ${TS:-4096,16384} --reps ${REPS:-3} --grouped-gemm $GG

if [ "${NCU:-1}" = 1 ]; then
  NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  echo "=== ncu ($NCU_BIN) over one warm-up + one fwd+bwd, T=${PROFILE_T:-16384}, ${GG##*,}"
  timeout ${NCU_TIMEOUT:-240} $NCU_BIN --clock-control none --metrics gpu__time_duration.sum --csv --print-summary per-kernel \
    /tmp/moe_bench --backend cuda --profile --kernels scatter --grouped-gemm ${GG##*,} --tokens ${PROFILE_T:-16384} --reps 1 \
    > "$OUT/ncu_summary.csv" 2> "$OUT/ncu_stderr.txt"
  echo "ncu exit $?; $(wc -l < "$OUT/ncu_summary.csv") lines"
  grep "profile T=" "$OUT/ncu_summary.csv"
fi

if [ "${CHECK:-1}" = 1 ]; then
  echo "=== moe_bench --check"
  timeout ${CHECK_TIMEOUT:-150} /tmp/moe_bench --backend cuda --tokens ${CHECK_T:-1024} --reps 1 --dtype bf16 --kernels scatter --check --grouped-gemm $GG ${CHECK_EXTRA:-}
fi
