#!/usr/bin/env bash
# One device call (nvidia-h200-x2): the trainer's data parallelism on GPUs. The same tiny job as
# 1 process x batch 4 and as 2 processes x batch 2 (our launcher, then torchrun), f32; the logged
# losses must agree. Expects .dev/bin/trainer.xz (release, --features cuda, stripped, xz).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/ddp_gpu.log") 2>&1
python3 -c 'import lzma,shutil; shutil.copyfileobj(lzma.open(".dev/bin/trainer.xz"), open("/tmp/trainer","wb"))'
chmod +x /tmp/trainer
NCCL_LIB=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')
export LD_LIBRARY_PATH=$NCCL_LIB:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0 CUDA_PATH=${CUDA_PATH:-/usr/local/cuda} RUST_LOG=warn
COMMON="--device cuda --max-steps 3 --seed 1 --gradient-accumulation-steps 2"
echo "=== 1 process x batch 4"
timeout 200 /tmp/trainer $COMMON --per-device-train-batch-size 4 --output-dir $OUT/single
echo "=== --nproc-per-node 2 x batch 2 (our launcher)"
timeout 200 /tmp/trainer $COMMON --per-device-train-batch-size 2 --nproc-per-node 2 --output-dir $OUT/ddp2
echo "launcher rc=$?"
echo "=== torchrun --nproc-per-node 2 x batch 2"
timeout 200 python3 -m torch.distributed.run --no-python --nproc-per-node 2 --master-port 29561 /tmp/trainer $COMMON --per-device-train-batch-size 2 --output-dir $OUT/torchrun2
echo "torchrun rc=$?"
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
def load(d):
    return [json.loads(l) for l in open(os.path.join(out, d, "metrics.jsonl"))]
ref = load("single")
for run in ["ddp2", "torchrun2"]:
    try:
        got = load(run)
    except OSError as e:
        print(run, "missing:", e); continue
    worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(ref, got) for k in ["loss", "lm_loss", "aux_loss", "grad_norm"])
    print(f"{run}: {len(got)} steps, max rel diff vs single (loss, lm, aux, grad_norm) = {worst:.2e}")
    for a, b in zip(ref, got):
        print(f"  step {a['step']}: loss {a['loss']:.7f} vs {b['loss']:.7f}")
PY
