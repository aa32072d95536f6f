#!/usr/bin/env bash
# One device call (nvidia-h200-x2 / -x4): NCCL correctness check of burn-moe's collectives, then
# bandwidth of ours and torch.distributed's side by side. Expects (carried, git-ignored)
# .dev/bin/nccl_check.xz (release build with --features nccl, stripped, xz). Logs to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/nccl_run.log") 2>&1
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import lzma,shutil; shutil.copyfileobj(lzma.open(".dev/bin/nccl_check.xz"), open("/tmp/nccl_check","wb"))'
chmod +x /tmp/nccl_check
NCCL_LIB=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')
export LD_LIBRARY_PATH=$NCCL_LIB:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0 CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
echo "=== check (world $NPROC, under torchrun)"
timeout 180 python3 -m torch.distributed.run --no-python --nproc-per-node $NPROC --master-port 29511 /tmp/nccl_check check
echo "check rc=$?"
echo "=== timeout: the last rank never joins an all_reduce (5 s timeout)"
timeout 60 python3 -m torch.distributed.run --no-python --nproc-per-node $NPROC --master-port 29521 /tmp/nccl_check timeout
echo "timeout rc=$?"
echo "=== bandwidth: burn-moe NCCL"
timeout 180 python3 -m torch.distributed.run --no-python --nproc-per-node $NPROC --master-port 29531 /tmp/nccl_check bench ${MAX_MIB:-1024}
echo "=== bandwidth: burn-moe NCCL with per-phase profile"
# Median host time of each phase of a call and the NCCL kernels' device time (burn-moe-profile
# lines, ranks 0 and 1), for the sizes where we trail torch (16-256 MiB).
PROFILE_MIB=$(( ${MAX_MIB:-1024} < 256 ? ${MAX_MIB:-1024} : 256 ))
BURN_MOE_NCCL_PROFILE=1 timeout 180 python3 -m torch.distributed.run --no-python --nproc-per-node $NPROC --master-port 29536 /tmp/nccl_check bench $PROFILE_MIB
# The default wait keeps CubeCL's device thread awake (WaitMode::Warm); BURN_MOE_NCCL_WAIT=block sleeps in
# cuStreamSynchronize, and the next call's device-pointer lookup pays the thread's wake-up (2026-11-30).
echo "=== bandwidth: burn-moe NCCL, BURN_MOE_NCCL_WAIT=block (a blocking wait), with per-phase profile"
BURN_MOE_NCCL_WAIT=block BURN_MOE_NCCL_PROFILE=1 timeout 180 python3 -m torch.distributed.run --no-python --nproc-per-node $NPROC --master-port 29538 /tmp/nccl_check bench $PROFILE_MIB
echo "=== bandwidth: burn-moe NCCL, output-buffer pool off (every output a fresh CubeCL buffer)"
BURN_MOE_NCCL_POOL_BYTES=0 timeout 180 python3 -m torch.distributed.run --no-python --nproc-per-node $NPROC --master-port 29541 /tmp/nccl_check bench ${MAX_MIB:-1024}
echo "=== bandwidth: torch.distributed NCCL"
timeout 180 python3 -m torch.distributed.run --nproc-per-node $NPROC --master-port 29551 bench/collectives_torch.py ${MAX_MIB:-1024}
