#!/usr/bin/env bash
# One device call (one Hopper GPU): the dMoE layer checked and timed next to torchtitan, with A/B runs of the
# wgmma kernel's output path (BURN_MOE_WGMMA_EPILOGUE = direct | wgrad | all (the build's default): stores from
# registers or through shared memory and TMA bulk stores; MODES, default "all"). Steps (STEPS, default "tests gemm layer ncu"):
#   tests   the small ragged CUDA GEMM cases (grouped_gemm `on_cuda`) and the Mixtral-size wgmma tests
#           (cuda_mixtral `wgmma`) per TEST_MODES;
#   scatter the scatter kernels (permute, grouped GEMMs, combine and its backward) against the reference (scatter
#           binary, `on_cuda`), and the router-gate kernels (gate binary) when carried;
#   check   moe_bench --check (output and every gradient against the f32 reference, small layer);
#   torch   the torchtitan-style layer of bench/torch_moe_layer.py with its kernels per fwd+bwd (--profile);
#   gemm    the GEMMs alone per mode (moe_bench --gemm, T=4096);
#   layer   torchtitan and the dense ceiling (anchors; ANCHOR_GEMM=1 adds their per-GEMM torch._grouped_mm
#           microbenchmark), then our layer per mode, same call;
#   ncu     per-launch kernel times of one fwd+bwd at T=4096 (bench/ncu_launches.py).
# Where the layer's time goes, GEMM by GEMM, ours and torch's: STEPS="torch gemm layer ncu" ANCHOR_GEMM=1 TS=4096.
# Expects the carried .dev/bin/{grouped_gemm,cuda_mixtral,scatter,gate,moe_bench}.xz and .dev/anchors/. Knobs:
# MODES, TEST_MODES, TS, REPS, ANCHOR_GEMM.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/layer_gpu.log") 2>&1
source bench/moe_bench_env.sh
for b in grouped_gemm cuda_mixtral scatter gate; do
  [ -f .dev/bin/$b.xz ] && python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/bin/$b.xz'), open('/tmp/$b','wb'))" && chmod +x /tmp/$b
done
MODES=${MODES:-all}
TS=${TS:-4096,16384}
rc=0
for step in ${STEPS:-tests gemm layer ncu}; do
  echo "=== $step $(date +%T)"
  case $step in
    tests)
      for m in ${TEST_MODES:-wgrad all}; do
        echo "--- tests, epilogue $m"
        BURN_MOE_WGMMA_EPILOGUE=$m timeout ${SMALL_TIMEOUT:-200} /tmp/grouped_gemm --test-threads 1 on_cuda > "$OUT/small_$m.log" 2>&1 || rc=1
        grep -E "^test |panicked|result" "$OUT/small_$m.log"
        BURN_MOE_WGMMA_EPILOGUE=$m timeout ${MIXTRAL_TIMEOUT:-150} /tmp/cuda_mixtral --nocapture --test-threads 2 wgmma > "$OUT/mixtral_$m.log" 2>&1 || rc=1
        grep -E "^test |rel|panicked|result" "$OUT/mixtral_$m.log" | cut -c1-220
      done ;;
    scatter)
      timeout ${SCATTER_TIMEOUT:-120} /tmp/scatter --test-threads 1 on_cuda > "$OUT/scatter.log" 2>&1 || rc=1
      grep -E "^test |panicked|result" "$OUT/scatter.log"
      if [ -x /tmp/gate ]; then
        timeout ${SCATTER_TIMEOUT:-120} /tmp/gate --test-threads 1 on_cuda > "$OUT/gate.log" 2>&1 || rc=1
        grep -E "^test |panicked|result" "$OUT/gate.log"
      fi ;;
    check)
      timeout ${CHECK_TIMEOUT:-150} /tmp/moe_bench --backend cuda --tokens ${CHECK_T:-1024} --reps 1 --dtype bf16 --kernels scatter --check \
        ${CHECK_EXTRA:---d 1024 --ffn 3584} > "$OUT/check.log" 2>&1 || rc=1
      grep -E "check|error|panicked" "$OUT/check.log" | cut -c1-200 ;;
    torch)
      PYTHONUNBUFFERED=1 timeout ${TORCH_TIMEOUT:-120} python3 bench/torch_moe_layer.py --tokens $TS --profile ;;
    gemm)
      for m in $MODES; do
        echo "--- GEMMs alone, epilogue $m"
        BURN_MOE_WGMMA_EPILOGUE=$m timeout ${GEMM_TIMEOUT:-120} /tmp/moe_bench --backend cuda --gemm --tokens 4096 --reps ${REPS:-5} --gemm-strategies wgmma > "$OUT/gemm_$m.log" 2>&1 || rc=1
        grep -E "Wgmma|error|panicked" "$OUT/gemm_$m.log"
      done ;;
    layer)
      mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --target /tmp/site .dev/anchors/whl/*.whl >/dev/null 2>&1
      ( cd .dev/anchors && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OUT="$OUT" TS=$TS GEMM=${ANCHOR_GEMM:-0} WARM=3 REPS=10 \
          ONLY=${ONLY:-torchtitan_moe,dense_2T} timeout ${ANCHOR_TIMEOUT:-200} python3 bench_moe.py ) | grep -E "SUMMARY|T= " | cut -c1-200
      for m in $MODES; do
        echo "--- layer, epilogue $m"
        BURN_MOE_WGMMA_EPILOGUE=$m timeout ${LAYER_TIMEOUT:-150} /tmp/moe_bench --backend cuda --tokens $TS --reps ${REPS:-5} --dtype bf16 --kernels scatter > "$OUT/layer_$m.log" 2>&1 || rc=1
        grep -E "scatter|error|panicked" "$OUT/layer_$m.log"
      done ;;
    ncu)
      NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
      timeout ${NCU_TIMEOUT:-200} $NCU_BIN --clock-control none --metrics gpu__time_duration.sum --csv \
        /tmp/moe_bench --backend cuda --profile --kernels scatter --tokens 4096 --reps 1 > "$OUT/ncu_launches.csv" 2> "$OUT/ncu_stderr.txt"
      echo "ncu exit $?"
      python3 bench/ncu_launches.py "$OUT/ncu_launches.csv" ;;
  esac
done
echo "=== done $(date +%T) rc=$rc"
exit $rc
