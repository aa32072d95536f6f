#!/usr/bin/env bash
# One device call on 2 GPUs (nvidia-h200-x2): sharded checkpoints resume under NCCL. For each plan, the tiny
# job runs 4 steps uninterrupted, then 2 steps + resume from checkpoint-2 to step 4; the per-step losses must
# agree. Expects .dev/bin/trainer.xz (release, --features cuda). PLANS as in parallel_gpu.sh; EXTRA adds flags.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/resume_gpu.log") 2>&1
source bench/trainer_env.sh
NPROC=${NPROC:-2}
for plan in ${PLANS:-"fsdp2" "ep2+fsdp1"}; do
  f=$(flags $plan)
  common="--device cuda --nproc-per-node $NPROC --per-device-train-batch-size 2 --seed 1 --lr-scheduler-type constant \
    --save-strategy steps --save-steps 2 $f ${EXTRA:-}"
  timeout 120 /tmp/trainer $common --max-steps 4 --output-dir $OUT/$plan-full >/dev/null
  timeout 120 /tmp/trainer $common --max-steps 2 --output-dir $OUT/$plan-part >/dev/null
  timeout 120 /tmp/trainer $common --max-steps 4 --output-dir $OUT/$plan-part --resume-from-checkpoint latest >/dev/null
  python3 - "$OUT/$plan-full" "$OUT/$plan-part" "$plan ${EXTRA:-}" <<'PY'
import json, sys, os
a, b = ([json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] for d in sys.argv[1:3])
worst = max((abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in ["loss", "grad_norm"]), default=float("nan"))
print(f"{sys.argv[3]:>30}: {len(a)} vs {len(b)} steps, max rel diff uninterrupted vs resumed = {worst:.2e}")
PY
done
