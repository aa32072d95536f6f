#!/usr/bin/env bash
# One device call (one GPU): where the dMoE layer's T=4096 time goes, ours and torch's, GEMM by GEMM.
# 1. torch: bench/torch_moe_layer.py --profile (the torchtitan-style layer, kernels per fwd+bwd);
# 2. the anchors' per-GEMM microbenchmark (torch._grouped_mm on each of the layer's six GEMM shapes) and
#    torchtitan's layer, T=$TS;
# 3. ours: moe_bench --gemm (each wgmma GEMM alone) and ncu per launch over one fwd+bwd at T=$PROFILE_T.
# Expects the carried .dev/bin/moe_bench.xz and .dev/anchors/. Knobs: TS, PROFILE_T, GEMM_STRATEGIES,
# TORCH=0, ANCHORS=0, NCU=0, MOE_ENV (e.g. "BURN_MOE_WGMMA_EPILOGUE=0") for our runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/gap_probe.log") 2>&1
source bench/moe_bench_env.sh
TS=${TS:-4096}
if [ "${TORCH:-1}" = 1 ]; then
  echo "=== torch layer + profile $(date +%T)"
  PYTHONUNBUFFERED=1 timeout ${TORCH_TIMEOUT:-120} python3 bench/torch_moe_layer.py --tokens $TS --profile
fi
if [ "${ANCHORS:-1}" = 1 ]; then
  echo "=== anchors: per-GEMM grouped_mm and torchtitan $(date +%T)"
  mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site .dev/anchors/whl/*.whl >/dev/null 2>&1
  ( cd .dev/anchors && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OUT="$OUT" TS=$TS GEMM=1 WARM=3 REPS=10 \
      ONLY=${ONLY:-torchtitan_moe} timeout ${ANCHOR_TIMEOUT:-200} python3 bench_moe.py ) | grep -E "^GEMM|SUMMARY|fwd|PEAK" | cut -c1-400
fi
echo "=== ours: grouped GEMMs alone $(date +%T)"
env ${MOE_ENV:-} timeout ${GEMM_TIMEOUT:-120} /tmp/moe_bench --backend cuda --gemm --tokens $TS --reps ${REPS:-5} --gemm-strategies ${GEMM_STRATEGIES:-wgmma}
echo "=== ours: the layer $(date +%T)"
env ${MOE_ENV:-} timeout ${BENCH_TIMEOUT:-120} /tmp/moe_bench --backend cuda --tokens $TS --reps ${REPS:-5} --dtype bf16 --kernels scatter
if [ "${NCU:-1}" = 1 ]; then
  NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  echo "=== ncu per launch, one warm-up + one fwd+bwd, T=${PROFILE_T:-4096} $(date +%T)"
  env ${MOE_ENV:-} timeout ${NCU_TIMEOUT:-200} $NCU_BIN --clock-control none --metrics gpu__time_duration.sum --csv \
    /tmp/moe_bench --backend cuda --profile --kernels scatter --tokens ${PROFILE_T:-4096} --reps 1 > "$OUT/ncu_launches.csv" 2> "$OUT/ncu_stderr.txt"
  echo "ncu exit $?"
  python3 bench/ncu_launches.py "$OUT/ncu_launches.csv"
fi
echo "=== done $(date +%T)"
