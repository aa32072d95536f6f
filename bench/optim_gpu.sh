#!/usr/bin/env bash
# One device call (one GPU): trainer builds side by side on the step's host and optimizer side (issue 6).
#  1. bench/ab_gpu.sh on VARIANTS (name:xz pairs, default "base:.dev/bin/trainer_base.xz
#     new:.dev/bin/trainer.xz"): the tiny f32 job compared, the Mixtral-shaped bf16 row of each, and the
#     bf16 rows' per-step losses and gradient norms compared with the first variant's;
#  2. the last variant's step phases (BURN_MOE_STEP_TIMERS=1: a device sync at each phase boundary, so
#     a phase's wall time shows whether the host or the device sets its pace);
#  3. the last variant's row at BATCH_BIG packed rows per step (default 4: the optimizer's share shrinks
#     as the tokens per step grow);
#  4. the last variant's steady step through CubeCL's profiler (bench/profile_step_gpu.sh) with PROFILE=1.
# Writes $OUT/optim_gpu.log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/optim_gpu.log") 2>&1
VARIANTS=${VARIANTS:-"base:.dev/bin/trainer_base.xz new:.dev/bin/trainer.xz"}
VARIANTS=$VARIANTS CPU_REF=0 STEPS=${STEPS:-8} OUT=$OUT bash bench/ab_gpu.sh > /dev/null 2>&1
grep -E "^\| ddp|tiny|max rel|torch bf16" "$OUT/ab_gpu.log"
first=${VARIANTS%%:*}; last=${VARIANTS##* }; lastname=${last%%:*}; lastxz=${last#*:}; lastxz=${lastxz%%:*}
echo "bf16 rows, per step, vs $first:"
python3 bench/compare_metrics.py "$OUT/$first/ddp-none" loss,grad_norm "vs $first" \
  $(for v in $VARIANTS; do echo "$OUT/${v%%:*}/ddp-none"; done)
export TRAINER_XZ=$lastxz
source bench/trainer_env.sh
python3 bench/mixtral_config.py /tmp/optim_config.json 2
echo "=== step phases ($lastname, synced at each phase)"
BURN_MOE_STEP_TIMERS=1 RUST_LOG=info timeout 150 /tmp/trainer --device cuda $(STEPS=6 mixtral_row /tmp/optim_config.json) \
  --use-lora none --dtype bf16 --moe-kernel scatter --output-dir /tmp/optim_timers 2>&1 | grep "step phases" | sed -E 's/^.*step phases/step phases/' | tail -3
echo "=== $lastname, ${BATCH_BIG:-4} packed rows per step"
BATCH=${BATCH_BIG:-4} OUT=$OUT/big NPROC=1 PLANS=ddp EQUIV=0 STEPS=${STEPS_BIG:-6} \
  EXTRA="--dtype bf16 --moe-kernel scatter" bash bench/parallel_gpu.sh 2>&1 | grep -E "^\| ddp|model:|rc="
if [ "${PROFILE:-0}" = 1 ]; then
  echo "=== CubeCL profile: $lastname"
  OUT=$OUT/$lastname PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-150} bash bench/profile_step_gpu.sh 2>&1 | tail -42
fi
