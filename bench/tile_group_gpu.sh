#!/usr/bin/env bash
# One device call (one GPU): the tile order of the pipelined CubeCL kernels (`set_tile_group`).
# 1. the grouped GEMMs alone at T=16384 with the default pipelined configurations, for each group;
# 2. the layer (reference and scatter + CubeCL) at T=4096 and 16384, scatter once per group, so the
#    scatter / reference ratio of issue 3 is read inside one run.
# Expects the carried .dev/bin/moe_bench.xz (release, --features cuda). Knobs: TILE_GROUPS (default
# 0,8,16,32 for the GEMMs), LAYER_TILE_GROUPS (default 0,16), TS, REPS, *_TIMEOUT. Logs under $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/tile_group.log") 2>&1
source bench/moe_bench_env.sh
echo "=== grouped GEMMs alone, per tile group $(date +%T)"
timeout ${GEMM_TIMEOUT:-200} /tmp/moe_bench --backend cuda --gemm --tokens ${GEMM_T:-16384} --reps ${REPS:-3} \
  --gemm-strategies 64x2w,32x4w --tile-group ${TILE_GROUPS:-0,8,16,32}
echo "=== layer, per tile group $(date +%T)"
timeout ${BENCH_TIMEOUT:-330} /tmp/moe_bench --backend cuda --tokens ${TS:-4096,16384} --reps ${REPS:-3} --dtype bf16 \
  --kernels reference,scatter --tile-group ${LAYER_TILE_GROUPS:-0,16}
echo "=== done $(date +%T)"
