#!/usr/bin/env bash
# One device call (nvidia-h200-x2, NPROC=4 on -x4): the trainer's data parallelism on GPUs. The same
# tiny job as 1 process x batch 4 and as NPROC processes x batch 4/NPROC (our launcher, then torchrun), f32; the logged
# losses must agree. Expects .dev/bin/trainer.xz (release, --features cuda, stripped, xz).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/ddp_gpu.log") 2>&1
source bench/trainer_env.sh
NPROC=${NPROC:-2}
PER=$((4 / NPROC))
COMMON="--device cuda --max-steps 3 --seed 1 --gradient-accumulation-steps 2"
echo "=== 1 process x batch 4"
timeout 200 /tmp/trainer $COMMON --per-device-train-batch-size 4 --output-dir $OUT/single
echo "=== --nproc-per-node $NPROC x batch $PER (our launcher)"
timeout 200 /tmp/trainer $COMMON --per-device-train-batch-size $PER --nproc-per-node $NPROC --output-dir $OUT/ddp$NPROC
echo "launcher rc=$?"
echo "=== torchrun --nproc-per-node $NPROC x batch $PER"
timeout 200 python3 -m torch.distributed.run --no-python --nproc-per-node $NPROC --master-port 29561 /tmp/trainer $COMMON --per-device-train-batch-size $PER --output-dir $OUT/torchrun$NPROC
echo "torchrun rc=$?"
python3 - "$OUT" "$NPROC" <<'PY'
import json, sys, os
out, n = sys.argv[1], sys.argv[2]
def load(d):
    return [json.loads(l) for l in open(os.path.join(out, d, "metrics.jsonl"))]
ref = load("single")
for run in ["ddp" + n, "torchrun" + n]:
    try:
        got = load(run)
    except OSError as e:
        print(run, "missing:", e); continue
    worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(ref, got) for k in ["loss", "lm_loss", "aux_loss", "grad_norm"])
    print(f"{run}: {len(got)} steps, max rel diff vs single (loss, lm, aux, grad_norm) = {worst:.2e}")
    for a, b in zip(ref, got):
        print(f"  step {a['step']}: loss {a['loss']:.7f} vs {b['loss']:.7f}")
PY
