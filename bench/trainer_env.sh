# Sourced by the GPU scripts that run the trainer (ddp_gpu.sh, parallel_gpu.sh, resume_gpu.sh): unpacks the
# carried binary (.dev/bin/trainer.xz: release, --features cuda, stripped, xz) to /tmp/trainer and puts the
# pip wheels' libnccl.so.2 and libcublas on the library path (bench/cuda_libs.sh).
python3 -c 'import lzma,shutil; shutil.copyfileobj(lzma.open(".dev/bin/trainer.xz"), open("/tmp/trainer","wb"))'
chmod +x /tmp/trainer
source "$(dirname "${BASH_SOURCE[0]}")/cuda_libs.sh"
export RUST_LOG=warn
# A plan name of the GPU scripts (fsdp2, fsdp1, ddp, ep<N>+<sharding>) -> trainer flags.
flags() { # plan -> trainer flags
  case $1 in
    fsdp2) echo "--sharding fsdp2";;
    fsdp1) echo "--sharding fsdp1";;
    fsdp2-step) echo "--sharding fsdp2 --fsdp-gather step";;
    fsdp1-step) echo "--sharding fsdp1 --fsdp-gather step";;
    ddp) echo "--sharding ddp";;
    ep*+*) local ep=${1%%+*}; echo "--ep-size ${ep#ep} --sharding ${1#*+}";;
  esac
}
