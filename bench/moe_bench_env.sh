# Sourced by the GPU scripts that run moe_bench (gpu_run.sh, profile_gpu.sh): prints the card, unpacks the
# carried binary (.dev/bin/moe_bench.xz: release, --features cuda, stripped, xz) to /tmp/moe_bench, puts the
# CUDA libraries on the library path (cuda_libs.sh) and keeps CubeCL's autotuning short.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import lzma,shutil; shutil.copyfileobj(lzma.open(".dev/bin/moe_bench.xz"), open("/tmp/moe_bench","wb"))'
chmod +x /tmp/moe_bench
source "$(dirname "${BASH_SOURCE[0]}")/cuda_libs.sh"
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
