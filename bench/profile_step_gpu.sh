#!/usr/bin/env bash
# One device call (one GPU): where a training step's device time goes, kernel by kernel and phase by
# phase, from CubeCL's own profiler (every launch timed on the device; the launches are serialised,
# so the step is slower than usual, but each kernel's time is its own). The trainer runs at
# Mixtral-8x7B layer shapes (LAYERS layers, one packed row of SEQ tokens, bf16, STEPS steps, EXTRA
# flags) with BURN_MOE_STEP_TIMERS=1, whose device syncs at each phase boundary make CubeCL print one
# summary table per phase. bench/cubecl_profile.py condenses the last step into the log.
# Expects the carried .dev/bin/trainer.xz. Writes $OUT/profile_step.log (and the raw trace, xz).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/profile_step.log") 2>&1
source bench/trainer_env.sh
LAYERS=${LAYERS:-2}; SEQ=${SEQ:-4096}; STEPS=${STEPS:-4}
python3 bench/mixtral_config.py /tmp/profile_config.json "$LAYERS"
echo "=== CubeCL profile: $LAYERS layers, seq $SEQ, $STEPS steps, ${EXTRA:-}"
rm -f /tmp/cubecl_profile.log  # CubeCL appends to its log file
CUBECL_DEBUG_LOG=/tmp/cubecl_profile.log CUBECL_DEBUG_OPTION=${PROFILE_LEVEL:-profile-full} BURN_MOE_STEP_TIMERS=1 RUST_LOG=info \
  timeout ${PROFILE_TIMEOUT:-300} /tmp/trainer --device cuda $(mixtral_row /tmp/profile_config.json) \
  --use-lora none --dtype bf16 --moe-kernel scatter ${EXTRA:-} \
  --output-dir /tmp/profile_run > /tmp/profile_stdout.txt 2>&1
echo "trainer exit $?"
grep -E "step phases|rror" /tmp/profile_stdout.txt | sed -E 's/^.*(step=[0-9]+)/\1/'
ls -la /tmp/cubecl_profile.log
python3 bench/cubecl_profile.py /tmp/cubecl_profile.log "$STEPS"
xz -T4 -6 -c /tmp/cubecl_profile.log > "$OUT/cubecl_profile.log.xz" 2>/dev/null
