# Sourced by the GPU scripts that run the trainer (ddp_gpu.sh, parallel_gpu.sh, resume_gpu.sh): unpacks the
# carried binary (.dev/bin/trainer.xz: release, --features cuda, stripped, xz) to /tmp/trainer and puts the
# pip wheel's libnccl.so.2 on the library path (NVLink multicast off, as the device notes ask).
python3 -c 'import lzma,shutil; shutil.copyfileobj(lzma.open(".dev/bin/trainer.xz"), open("/tmp/trainer","wb"))'
chmod +x /tmp/trainer
NCCL_LIB=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')
export LD_LIBRARY_PATH=$NCCL_LIB:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0 CUDA_PATH=${CUDA_PATH:-/usr/local/cuda} RUST_LOG=warn
