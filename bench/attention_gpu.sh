#!/usr/bin/env bash
# One device call (one GPU): the trainer's attention kernels (and optimizer) side by side at
# Mixtral-8x7B layer shapes, on the same card in the same call, through bench/parallel_gpu.sh's table
# (LAYERS layers, packed rows of SEQ tokens, STEPS steps, bf16, scatter kernels; LORAS as there).
# VARIANTS lists the rows: `eager` / `chunked` (`--attention`), with `+fused` adding `--fused-adamw`
# (default "eager chunked chunked+fused"). Before timing, each variant's losses on the tiny model are
# compared with the eager run (f32). TIMERS=1 adds one run of the last variant with
# BURN_MOE_STEP_TIMERS=1 (phases of each step, device synced at each boundary). Expects
# .dev/bin/trainer.xz; writes $OUT/<variant> and the log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/attention_gpu.log") 2>&1
source bench/trainer_env.sh
VARIANTS=${VARIANTS:-"eager chunked chunked+fused"}
variant_flags() { # eager | chunked, optionally +fused -> trainer flags
  local f="--attention ${1%%+*}"
  [[ $1 == *+fused ]] && f="$f --fused-adamw"
  echo "$f"
}
for v in eager $VARIANTS; do
  [ -d "$OUT/tiny-$v" ] && continue
  timeout 120 /tmp/trainer --device cuda --max-steps 3 --seed 1 --per-device-train-batch-size 4 \
    $(variant_flags $v) --output-dir $OUT/tiny-$v >/dev/null || echo "tiny $v: rc=$?"
done
echo "tiny model, f32:"
python3 bench/compare_metrics.py "$OUT/tiny-eager" loss,lm_loss,grad_norm "vs eager" $(for v in $VARIANTS; do echo "$OUT/tiny-$v"; done)
for v in $VARIANTS; do
  echo "##### $v: $(variant_flags $v)"
  OUT=$OUT/$v NPROC=1 PLANS=ddp EQUIV=0 \
    EXTRA="--dtype bf16 --moe-kernel scatter $(variant_flags $v) ${EXTRA:-}" bash bench/parallel_gpu.sh
done
if [ "${TIMERS:-0}" = 1 ]; then
  v=${VARIANTS##* }
  echo "##### step phases, $v (BURN_MOE_STEP_TIMERS=1)"
  python3 bench/mixtral_config.py "$OUT/timers_config.json" "${LAYERS:-2}"
  BURN_MOE_STEP_TIMERS=1 RUST_LOG=info timeout 150 /tmp/trainer --device cuda $(mixtral_row "$OUT/timers_config.json") \
    --use-lora none --sharding ddp --dtype bf16 --moe-kernel scatter $(variant_flags $v) ${EXTRA:-} \
    --output-dir $OUT/timers 2>&1 | grep -E "step phases|rror" | sed -E 's/^.*(step=[0-9]+)/\1/'
fi
