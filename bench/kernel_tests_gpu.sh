#!/usr/bin/env bash
# One device call (one GPU): the kernels-cubecl CUDA test binary (tests/cuda_mixtral.rs) — every kernel
# family at Mixtral sizes (d 4096, ffn 14336, E 8, k 2, T 512) in bf16 and f32 against f64 references,
# every grouped-GEMM strategy the device supports, plus the small-size CUDA twins of the wgpu tests
# (*_on_cuda) and the host_* checks of the sampled references. Each Mixtral check prints its relative L2 error, so
# $OUT/kernel_tests.log is the record.
# Expects the carried .dev/bin/cuda_mixtral.xz: built here with
#   cargo test -p kernels-cubecl --features cuda --release --test cuda_mixtral --no-run
# then stripped and xz-compressed. Knobs: FILTER (test-name filters, default `mixtral on_cuda host_`: not the wgpu tests compiled in), TESTS_TIMEOUT (s),
# THREADS (test threads, default 1; more run the kernel compilations — most of the time — in parallel: each output
# line names its test and strategy, so interleaving keeps the log readable).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/kernel_tests.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import lzma,shutil; shutil.copyfileobj(lzma.open(".dev/bin/cuda_mixtral.xz"), open("/tmp/cuda_mixtral","wb"))'
chmod +x /tmp/cuda_mixtral
source bench/cuda_libs.sh
echo "=== cuda_mixtral ${FILTER:-(all tests)}"
timeout ${TESTS_TIMEOUT:-540} /tmp/cuda_mixtral --nocapture --test-threads ${THREADS:-1} ${FILTER:-mixtral on_cuda host_} 2>&1 | tee /tmp/cuda_mixtral.out
rc=${PIPESTATUS[0]}
echo "=== cuda_mixtral exit $rc; summary:"
grep -E "FAIL|UNSUPPORTED|panicked|^test |test result" /tmp/cuda_mixtral.out | head -80
exit $rc
