#!/usr/bin/env bash
# One device call (one Hopper GPU): the wgmma grouped GEMM (kernels-cubecl/src/scatter/wgmma*.rs) checked and
# timed. 1) the small ragged CUDA twins of the wgpu tests (grouped_gemm binary, `on_cuda`: every strategy incl.
# wgmma, f16, against the f64 reference); 2) the Mixtral-size wgmma tests (cuda_mixtral binary, filter `wgmma`:
# up/down projection and both weight gradients, bf16, against f64 samples and the f32 tiled kernel in full);
# 3) the grouped GEMMs alone at T=16384 (moe_bench --gemm), wgmma next to the manual-MMA CubeCL kernels.
# Expects the carried .dev/bin/{grouped_gemm,cuda_mixtral,moe_bench}.xz, built here with
#   cargo test -p kernels-cubecl --features cuda --release --test cuda_mixtral --test grouped_gemm --no-run
#   cargo build --release -p examples --features examples/cuda --example moe_bench
# (stripped, xz-compressed). Knobs: STEPS (default "small mixtral gemm"; also `layer_np`: the layer with
# BURN_MOE_WGMMA_PERSISTENT=0), GEMM_STRATEGIES, TS.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/wgmma.log") 2>&1
source bench/moe_bench_env.sh
for b in grouped_gemm cuda_mixtral; do
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/bin/$b.xz'), open('/tmp/$b','wb'))" && chmod +x /tmp/$b
done
rc=0
for step in ${STEPS:-small mixtral gemm}; do
  echo "=== $step $(date +%T)"
  case $step in
    small) timeout ${SMALL_TIMEOUT:-150} /tmp/grouped_gemm --nocapture --test-threads 1 on_cuda || rc=1 ;;
    mixtral) timeout ${MIXTRAL_TIMEOUT:-240} /tmp/cuda_mixtral --nocapture --test-threads ${THREADS:-2} wgmma || rc=1 ;;
    gemm) timeout ${GEMM_TIMEOUT:-150} /tmp/moe_bench --backend cuda --gemm --tokens ${TS:-16384} --reps ${REPS:-3} \
            --gemm-strategies ${GEMM_STRATEGIES:-wgmma,64x2wm,32x4wm} || rc=1 ;;
    # The layer with the kernel a cube per tile instead of persistent (the comparison for the default).
    layer_np) BURN_MOE_WGMMA_PERSISTENT=0 timeout ${LAYER_TIMEOUT:-150} /tmp/moe_bench --backend cuda --tokens ${TS:-4096,16384} \
            --reps ${REPS:-3} --dtype bf16 --kernels scatter || rc=1 ;;
  esac
done
echo "=== done $(date +%T) rc=$rc"
exit $rc
