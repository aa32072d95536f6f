#!/usr/bin/env bash
# One device call (one GPU): the trainer's attention kernels side by side at Mixtral-8x7B layer shapes —
# `--attention eager` (HF's materialised scores) then `--attention chunked` (blocked, fused softmax
# kernels, scores recomputed in the backward pass) — on the same card in the same call, through
# bench/parallel_gpu.sh's table (LAYERS layers, packed rows of SEQ tokens, STEPS steps, bf16, scatter
# kernels; LORAS as there). Before timing, each attention's losses on the tiny model are compared with
# the eager run (f32). Expects .dev/bin/trainer.xz; writes $OUT/eager, $OUT/chunked and the log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/attention_gpu.log") 2>&1
source bench/trainer_env.sh
for att in eager chunked; do
  timeout 120 /tmp/trainer --device cuda --max-steps 3 --seed 1 --per-device-train-batch-size 4 \
    --attention $att --output-dir $OUT/tiny-$att >/dev/null || echo "tiny $att: rc=$?"
done
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
load = lambda d: [json.loads(l) for l in open(os.path.join(out, d, "metrics.jsonl"))]
a, b = load("tiny-eager"), load("tiny-chunked")
worst = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in ["loss", "lm_loss", "grad_norm"])
print(f"tiny f32, chunked vs eager attention: {len(b)} steps, max rel diff (loss, lm_loss, grad_norm) = {worst:.2e}")
PY
for att in eager chunked; do
  echo "##### --attention $att"
  OUT=$OUT/$att NPROC=1 PLANS=ddp EQUIV=0 \
    EXTRA="--dtype bf16 --moe-kernel scatter --attention $att ${EXTRA:-}" bash bench/parallel_gpu.sh
done
