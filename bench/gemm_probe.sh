#!/usr/bin/env bash
# One device call (one GPU): what the CubeCL tensor-core grouped GEMM compiles to and what limits it.
# 1. moe_bench --gemm at T=4096 with CubeCL's compilation log on: the generated CUDA source of every
#    kernel goes to $OUT/cubecl_src.log (the cmma kernels are cut out to $OUT/cmma_src.cu);
# 2. ncu with the occupancy / launch / warp-state / throughput sections over the cmma kernels.
# Expects the carried .dev/bin/moe_bench.xz (release, --features cuda). Knobs: T, NCU=0, SRC=0 (skip the
# source dump), NCU_KERNEL (regex, default cmma), NCU_SKIP / NCU_COUNT (which launches of it).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/gemm_probe.log") 2>&1
source bench/moe_bench_env.sh
T=${T:-4096}
if [ "${SRC:-1}" = 1 ]; then
echo "=== moe_bench --gemm T=$T (compilation log on)"
CUBECL_DEBUG_LOG="$OUT/cubecl_src.log" timeout ${GEMM_TIMEOUT:-200} /tmp/moe_bench --backend cuda --gemm --tokens $T --reps 3 ${GEMM_EXTRA:-}
python3 - "$OUT/cubecl_src.log" "$OUT/cmma_src.cu" <<'PY'
import sys, re
src = open(sys.argv[1], errors="replace").read()
# keep every compiled kernel whose name mentions cmma (one copy per distinct name)
parts = re.split(r'(?=extern "C" __global__)', src)
seen, keep = set(), []
for p in parts:
    m = re.match(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)', p)
    if m and "cmma" in m.group(1) and m.group(1) not in seen:
        seen.add(m.group(1)); keep.append(p[:60000])
open(sys.argv[2], "w").write("\n\n".join(keep))
print("cmma kernels in the log:", sorted(seen), "log bytes", len(src))
PY
fi
if [ "${NCU:-1}" = 1 ]; then
  NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  echo "=== ncu sections over the cmma kernels"
  timeout ${NCU_TIMEOUT:-240} $NCU_BIN --clock-control none --kernel-name regex:${NCU_KERNEL:-cmma} --launch-skip ${NCU_SKIP:-0} --launch-count ${NCU_COUNT:-3} \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats \
    /tmp/moe_bench --backend cuda --gemm --tokens $T --reps 1 ${GEMM_EXTRA:-} > "$OUT/ncu_cmma.txt" 2>&1
  echo "ncu exit $?"
  grep -v "^==PROF==" "$OUT/ncu_cmma.txt" | grep -E "grouped_matmul|Duration|Registers|Shared Memory Config|Dynamic Shared|Static Shared|Achieved Occupancy|Theoretical Occupancy|Block Limit|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L1/TEX Hit|Warp Cycles Per Issued|Issued Warp|No Eligible|Stall|Executed Ipc|One or More|Threads|Waves" | head -150
fi
