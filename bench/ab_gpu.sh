#!/usr/bin/env bash
# One device call (one GPU): two (or more) trainer builds side by side on the same card in the same call.
# VARIANTS lists name:path-to-xz pairs (default "base:.dev/bin/trainer_base.xz new:.dev/bin/trainer.xz"), each
# optionally with a third field of environment settings for that variant, comma-separated (e.g.
# "portable:.dev/bin/trainer.xz:BURN_MOE_WGMMA=0" runs the same build without the Hopper GEMM kernel).
#  1. torch's bf16 8192^3 matmul rate on this card (the denominator of the TFLOP/s target);
#  2. each build's tiny job (f32, 3 steps, batch 4), its losses compared with the first build's and
#     (CPU_REF=1, the default) with the last build's run on the CPU (ndarray);
#  3. each build's Mixtral-shaped table row (bench/parallel_gpu.sh: LAYERS layers, packed rows of SEQ tokens,
#     STEPS steps, bf16, scatter kernels, full fine-tune unless LORAS says otherwise, EXTRA flags);
#  4. PROFILE="name ...": those builds' steps through CubeCL's profiler (bench/profile_step_gpu.sh).
# Writes $OUT/ab_gpu.log and one folder per build.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/ab_gpu.log") 2>&1
VARIANTS=${VARIANTS:-"base:.dev/bin/trainer_base.xz new:.dev/bin/trainer.xz"}
first=""
# name, binary and environment of a variant.
parse() { IFS=: read -r name xz envs <<< "$1"; envs=${envs//,/ }; }
for v in $VARIANTS; do
  parse "$v"; export TRAINER_XZ=$xz
  source bench/trainer_env.sh
  timeout 120 env $envs /tmp/trainer --device cuda --max-steps 3 --seed 1 --per-device-train-batch-size 4 \
    --output-dir $OUT/tiny-$name >/dev/null || echo "tiny $name: rc=$?"
  first=${first:-$name}
done
echo "tiny model, f32, 3 steps:"
python3 bench/compare_metrics.py "$OUT/tiny-$first" loss,lm_loss,grad_norm "vs $first" \
  $(for v in $VARIANTS; do echo "$OUT/tiny-${v%%:*}"; done)
if [ "${CPU_REF:-1}" = 1 ]; then
  # The same job on the CPU (ndarray, f32 without tensor cores): which GPU build is nearer the exact sums.
  timeout 300 /tmp/trainer --device ndarray --max-steps 3 --seed 1 --per-device-train-batch-size 4 \
    --output-dir $OUT/tiny-cpu >/dev/null || echo "tiny cpu: rc=$?"
  python3 bench/compare_metrics.py "$OUT/tiny-cpu" loss,lm_loss,grad_norm "vs the CPU" \
    $(for v in $VARIANTS; do echo "$OUT/tiny-${v%%:*}"; done)
fi
gemm=1
for v in $VARIANTS; do
  parse "$v"
  echo "##### $name ($xz${envs:+ with $envs})"
  env $envs TRAINER_XZ=$xz OUT=$OUT/$name NPROC=1 PLANS=ddp EQUIV=0 GEMM_RATE=$gemm STEPS=${STEPS:-8} \
    EXTRA="--dtype bf16 --moe-kernel scatter ${EXTRA:-}" bash bench/parallel_gpu.sh
  gemm=0
done
for v in $VARIANTS; do
  parse "$v"
  [[ " ${PROFILE:-} " == *" $name "* ]] || continue
  echo "##### CubeCL profile: $name"
  env $envs TRAINER_XZ=$xz OUT=$OUT/$name bash bench/profile_step_gpu.sh
done
