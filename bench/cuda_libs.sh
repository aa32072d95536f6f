# Sourced by the GPU scripts: puts the pip wheels' libnccl.so.2 and libcublas.so.13 (shipped with torch,
# loaded by our binaries at run time) on the library path, NVLink multicast off as the device notes ask.
CUDA_LIBS=$(python3 - <<'PY'
import glob, os, nvidia
dirs = set()
for root in nvidia.__path__:
    for pat in ("*/lib/libnccl.so*", "*/lib/libcublas.so*", "*/*/lib/libcublas.so*"):
        dirs.update(os.path.dirname(p) for p in glob.glob(os.path.join(root, pat)))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$CUDA_LIBS:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0 CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
