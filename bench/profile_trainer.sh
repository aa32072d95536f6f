#!/usr/bin/env bash
# One device call (one GPU): ncu kernel durations over a short trainer run at Mixtral-8x7B layer shapes
# (LAYERS layers, seq SEQ, bf16, STEPS steps, EXTRA flags), to see where a training step's time goes.
# Expects the carried .dev/bin/trainer.xz. Writes $OUT/trainer_ncu.csv (per-kernel summary) and the log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/trainer_env.sh
LAYERS=${LAYERS:-1}; SEQ=${SEQ:-4096}; STEPS=${STEPS:-2}
python3 bench/mixtral_config.py "$OUT/mixtral_${LAYERS}l.json" "$LAYERS"
NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout ${NCU_TIMEOUT:-400} $NCU_BIN --clock-control none --metrics gpu__time_duration.sum --csv --print-summary per-kernel \
  /tmp/trainer --device cuda --model-config "$OUT/mixtral_${LAYERS}l.json" --per-device-train-batch-size 1 --packing \
  --max-seq-length $SEQ --max-steps $STEPS --logging-steps 1 --learning-rate 1e-5 ${EXTRA:---dtype bf16 --moe-kernel scatter --grouped-gemm cublas} \
  --output-dir "$OUT/run" > "$OUT/trainer_ncu.csv" 2> "$OUT/trainer_ncu.err"
echo "ncu exit $?"
cat "$OUT/run/metrics.jsonl" 2>/dev/null
