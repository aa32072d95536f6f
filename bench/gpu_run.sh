#!/usr/bin/env bash
# One device call: torch anchors and our dMoE benchmark side by side on the same card.
# Expects (carried, git-ignored): .dev/bin/moe_bench.xz (release build with --features cuda, stripped,
# xz-compressed) and .dev/anchors/ (a copy of ../shared/anchors). Writes logs to $OUT.
# Knobs: GEMM=1 first times the grouped GEMMs alone (moe_bench --gemm); TORCH_LAYER=0 skips the repo's torch
# script (bench/torch_moe_layer.py: the same layer with torch._grouped_mm); ANCHORS=0 skips the torch
# anchors; BENCH_KERNELS=scatter limits the layer bench to those paths; GROUPED_GEMM=cubecl,cublas
# times the scatter path with each expert-GEMM library (and checks both); PHASES=1 adds the forward
# step by step; CHECK_EXTRA (e.g. "--d 1024 --ffn 3584") shrinks the check's layer; PIPELINED (e.g.
# "default,64x2w/32x4w") times the CubeCL layer once per pipelined configuration and CHECK_PIPELINED
# picks the one the check runs with, CHECK=0 skips the check; TS, REPS, *_TIMEOUT. Each section's start time is printed.
# The device tool sends the checkout the session started in (not a helper's worktree): a helper's
# binary and this script must be copied into an ignored folder there and carried.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
source bench/moe_bench_env.sh
GG=${GROUPED_GEMM:-cubecl}
TS=${TS:-4096,16384}

if [ "${GEMM:-0}" = 1 ]; then
  echo "=== grouped GEMMs alone (moe_bench --gemm) $(date +%T)"
  timeout ${GEMM_TIMEOUT:-90} /tmp/moe_bench --backend cuda --gemm --tokens $TS --reps ${REPS:-3} --grouped-gemm $GG
fi

if [ "${TORCH_LAYER:-1}" = 1 ]; then
echo "=== torch: the same layer with torch._grouped_mm, and dense SwiGLU (bench/torch_moe_layer.py) $(date +%T)"
PYTHONUNBUFFERED=1 timeout ${TORCH_TIMEOUT:-150} python3 bench/torch_moe_layer.py --check --tokens $TS
fi

if [ "${ANCHORS:-1}" = 1 ]; then
echo "=== torch anchors (same card, same call) $(date +%T)"
mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site .dev/anchors/whl/*.whl >/dev/null 2>&1
( cd .dev/anchors && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OUT="$OUT" TS=$TS GEMM=0 WARM=3 REPS=10 \
    ONLY=${ONLY:-own_gmm_fused,torchtitan_moe,dense_2T} timeout ${ANCHOR_TIMEOUT:-200} python3 bench_moe.py ) \
    | grep -vE "^\{|^ *\"" | tail -25
fi

echo "=== burn-moe moe_bench (bf16) $(date +%T)"
timeout ${BENCH_TIMEOUT:-240} /tmp/moe_bench --backend cuda --tokens $TS --reps ${REPS:-3} --dtype bf16 ${BENCH_KERNELS:+--kernels $BENCH_KERNELS} --grouped-gemm $GG --pipelined ${PIPELINED:-default}
if [ "${PHASES:-0}" = 1 ]; then
  echo "=== phases of the scatter forward"
  timeout ${PHASES_TIMEOUT:-120} /tmp/moe_bench --backend cuda --phases --tokens $TS --reps ${REPS:-3} --grouped-gemm $GG
fi
if [ "${CHECK:-1}" = 1 ]; then
echo "=== burn-moe moe_bench --check (f32 reference vs scatter f32/bf16) $(date +%T)"
timeout ${CHECK_TIMEOUT:-120} /tmp/moe_bench --backend cuda --tokens ${CHECK_T:-2048} --reps 1 --dtype bf16 --kernels scatter --check --grouped-gemm $GG --pipelined ${CHECK_PIPELINED:-default} ${CHECK_EXTRA:-}
fi
echo "=== done $(date +%T)"
du -sh ~/.cache/cubecl 2>/dev/null
