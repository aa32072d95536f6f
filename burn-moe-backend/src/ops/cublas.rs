//! cuBLAS expert GEMMs for CUDA `CubeBackend` tensors (selected by [`crate::gemm::GroupedGemm`]).
//!
//! One `cublasGemmEx` per non-empty expert segment, operands in their storage type (bf16, f16 or
//! f32), f32 accumulation (`CUBLAS_COMPUTE_32F`), output in the storage type. Eight large GEMMs per
//! projection keep cuBLAS at its dense rate; a grouped-batched call would only save launches.
//!
//! # Synchronisation
//! As for the NCCL collectives (`dist::nccl`): CubeCL 0.10 does not expose its CUDA stream, so each
//! grouped GEMM syncs the Burn device (its inputs are final), runs on a stream of our own, and waits
//! for that stream before returning (its output is final before Burn can read it), polling it so
//! that CubeCL's device thread stays awake ([`crate::cuda::wait_stream_warm`]). The host waits once
//! per grouped GEMM: 9 times per layer forward+backward for the experts, against milliseconds of
//! GEMM each at Mixtral shapes — but the dense layers and the attention products take the grouped
//! op too (`ops::moe_linear`), and in the trainer those waits outweigh cuBLAS's faster GEMMs
//! (BENCHMARKS.md).
//!
//! # Layouts
//! Burn tensors are row-major; cuBLAS is column-major. A row-major `[r, c]` buffer is the
//! column-major `[c, r]` matrix, so the row-major product `Y = X · Wᵀ` is computed as the
//! column-major `Yᵀ = W · Xᵀ`, with the operands passed as they lie in memory.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use burn::tensor::{DType, backend::Backend};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::cuda::CudaRuntime;
use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::{result as cu, sys as cusys};

use super::cube::empty_nd;

/// A cuBLAS handle bound to a stream of our own in the device's primary context (the one CubeCL
/// uses). Kept per thread and device: cuBLAS handles are not meant to be shared between threads.
struct Blas {
    handle: bsys::cublasHandle_t,
    stream: cusys::CUstream,
    ctx: cusys::CUcontext,
}

thread_local! {
    static HANDLES: RefCell<HashMap<usize, Blas>> = RefCell::new(HashMap::new());
}

/// Loads libcublas and creates a handle on the current thread's first CUDA device, so that a missing
/// library or driver is reported when cuBLAS is selected.
pub fn cublas_available() -> Result<(), String> {
    // SAFETY: only probes for the shared library.
    if !unsafe { bsys::is_culib_present() } {
        return Err("libcublas was not found on the library path (LD_LIBRARY_PATH); torch's wheel ships it \
                    under site-packages/nvidia/cu13/lib"
            .into());
    }
    with_blas(0, |_| Ok(()))
}

fn with_blas<T>(ordinal: usize, f: impl FnOnce(&Blas) -> Result<T, String>) -> Result<T, String> {
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        if !handles.contains_key(&ordinal) {
            handles.insert(ordinal, create(ordinal)?);
        }
        let blas = &handles[&ordinal];
        // SAFETY: the context was retained in `create` and is never released while the handle lives.
        unsafe { cu::ctx::set_current(blas.ctx) }.map_err(|e| format!("cuCtxSetCurrent: {e:?}"))?;
        f(blas)
    })
}

fn create(ordinal: usize) -> Result<Blas, String> {
    let ctx = crate::cuda::activate_primary_context(ordinal)?;
    // SAFETY: plain driver and cuBLAS calls in the current (primary) context.
    unsafe {
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(|e| format!("creating a stream: {e:?}"))?;
        let handle = blas::create_handle().map_err(|e| format!("cublasCreate: {e:?}"))?;
        blas::set_stream(handle, stream as _).map_err(|e| format!("cublasSetStream: {e:?}"))?;
        Ok(Blas { handle, stream, ctx })
    }
}

fn data_type(dtype: DType) -> Option<bsys::cudaDataType> {
    match dtype {
        DType::BF16 => Some(bsys::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(bsys::cudaDataType::CUDA_R_16F),
        DType::F32 => Some(bsys::cudaDataType::CUDA_R_32F),
        _ => None,
    }
}

fn as_cuda<R: CubeRuntime>(t: &CubeTensor<R>) -> Option<&CubeTensor<CudaRuntime>> {
    (t as &dyn Any).downcast_ref::<CubeTensor<CudaRuntime>>()
}

fn from_cuda<R: CubeRuntime>(t: CubeTensor<CudaRuntime>) -> CubeTensor<R> {
    *(Box::new(t) as Box<dyn Any>).downcast::<CubeTensor<R>>().unwrap_or_else(|_| unreachable!("called only when R is CudaRuntime"))
}

fn ptr(t: &CubeTensor<CudaRuntime>) -> u64 {
    let resource = t.client.get_resource(t.handle.clone()).unwrap_or_else(|e| panic!("cuBLAS grouped GEMM: device buffer: {e:?}"));
    resource.resource().ptr
}

/// One column-major `C = op(A) · op(B)` per segment, queued on our stream.
struct Gemm {
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    c: u64,
    ldc: usize,
}

fn op(t: bool) -> bsys::cublasOperation_t {
    if t { bsys::cublasOperation_t::CUBLAS_OP_T } else { bsys::cublasOperation_t::CUBLAS_OP_N }
}

fn int(v: usize, what: &str) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("{what} = {v} exceeds cuBLAS's 32-bit sizes"))
}

/// Syncs Burn, queues `gemms` (and `zero` byte ranges) on our stream, waits for it.
fn run(like: &CubeTensor<CudaRuntime>, dtype: DType, zero: &[(u64, usize)], gemms: &[Gemm]) -> Result<(), String> {
    let ty = data_type(dtype).ok_or_else(|| format!("dtype {dtype:?} is not supported (bf16, f16, f32)"))?;
    <CubeBackend<CudaRuntime, f32, i32, u8> as Backend>::sync(&like.device).map_err(|e| format!("syncing Burn: {e:?}"))?;
    with_blas(like.device.index, |blas| {
        let (alpha, beta) = (1.0f32, 0.0f32);
        for &(p, bytes) in zero {
            // SAFETY: `p..p+bytes` lies inside a buffer we allocated for this call.
            unsafe { cu::memset_d8_async(p, 0, bytes, blas.stream) }.map_err(|e| format!("cuMemsetD8Async: {e:?}"))?;
        }
        for g in gemms {
            // SAFETY: the pointers address live, contiguous Burn buffers of the sizes the leading
            // dimensions imply (checked by the callers' shape asserts); Burn is idle (synced above)
            // and waits for this stream below before it can touch them again.
            unsafe {
                blas::gemm_ex(
                    blas.handle,
                    op(g.transa),
                    op(g.transb),
                    int(g.m, "m")?,
                    int(g.n, "n")?,
                    int(g.k, "k")?,
                    (&alpha as *const f32).cast::<c_void>(),
                    g.a as *const c_void,
                    ty,
                    int(g.lda, "lda")?,
                    g.b as *const c_void,
                    ty,
                    int(g.ldb, "ldb")?,
                    (&beta as *const f32).cast::<c_void>(),
                    g.c as *mut c_void,
                    ty,
                    int(g.ldc, "ldc")?,
                    bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| format!("cublasGemmEx (m={}, n={}, k={}): {e:?}", g.m, g.n, g.k))?;
        }
        // Polling with an empty Burn sync in between keeps CubeCL's device thread awake for the
        // next Burn call (see `crate::cuda::wait_stream_warm`).
        // SAFETY: our stream, created in `create`; its context was made current by `with_blas`.
        unsafe {
            crate::cuda::wait_stream_warm(blas.stream, || {
                let _ = <CubeBackend<CudaRuntime, f32, i32, u8> as Backend>::sync(&like.device);
            })
        }
        .map_err(|e| format!("waiting for the cuBLAS stream: {e:?}"))
    })
}

/// [`MoeBackend::moe_grouped_matmul`](super::MoeBackend::moe_grouped_matmul) through cuBLAS, or
/// `None` when the tensors are not CUDA tensors. `x` and `w` must be contiguous.
pub(crate) fn grouped_matmul<R: CubeRuntime>(x: &CubeTensor<R>, w: &CubeTensor<R>, offsets: &[usize], transpose: bool) -> Option<CubeTensor<R>> {
    let (x, w) = (as_cuda(x)?, as_cuda(w)?);
    let (rows, k) = (x.meta.shape()[0], x.meta.shape()[1]);
    let ws = w.meta.shape();
    let m = if transpose { ws[1] } else { ws[2] };
    let out = empty_nd(x, [rows, m], x.dtype);
    let (px, pw, po, es) = (ptr(x), ptr(w), ptr(&out), x.dtype.size() as u64);
    let gemms: Vec<Gemm> = offsets
        .windows(2)
        .enumerate()
        .filter(|(_, s)| s[1] > s[0])
        .map(|(e, s)| Gemm {
            // Row-major y[seg] = x[seg] · w[e]ᵀ (w[e]: [m, k]) is column-major yᵀ = w[e] · x[seg]ᵀ,
            // where w[e] lies as the column-major [k, m] matrix (transposed by cuBLAS) and x[seg]
            // as [k, rows]. Without `transpose`, w[e] ([k, m]) lies as column-major [m, k] already.
            transa: transpose,
            transb: false,
            m,
            n: s[1] - s[0],
            k,
            a: pw + (e * m * k) as u64 * es,
            lda: if transpose { k } else { m },
            b: px + (s[0] * k) as u64 * es,
            ldb: k,
            c: po + (s[0] * m) as u64 * es,
            ldc: m,
        })
        .collect();
    run(x, x.dtype, &[], &gemms).unwrap_or_else(|e| panic!("cuBLAS grouped matmul [{rows}x{k}]x{ws:?}: {e}"));
    Some(from_cuda(out))
}

/// [`MoeBackend::moe_grouped_matmul_weight_grad`](super::MoeBackend::moe_grouped_matmul_weight_grad)
/// through cuBLAS (`dw[e] = dy[seg]ᵀ · x[seg]`, zeros for empty segments), or `None` when the
/// tensors are not CUDA tensors. `dy` and `x` must be contiguous.
pub(crate) fn grouped_matmul_weight_grad<R: CubeRuntime>(dy: &CubeTensor<R>, x: &CubeTensor<R>, offsets: &[usize]) -> Option<CubeTensor<R>> {
    let (dy, x) = (as_cuda(dy)?, as_cuda(x)?);
    let (m, k) = (dy.meta.shape()[1], x.meta.shape()[1]);
    let experts = offsets.len() - 1;
    let dw = empty_nd(dy, [experts, m, k], dy.dtype);
    let (pd, px, pw, es) = (ptr(dy), ptr(x), ptr(&dw), dy.dtype.size() as u64);
    let mut zero = Vec::new();
    let mut gemms = Vec::new();
    for (i, s) in offsets.windows(2).enumerate() {
        let c = pw + (i * m * k) as u64 * es;
        if s[1] == s[0] {
            zero.push((c, m * k * es as usize));
            continue;
        }
        // Row-major dw[e] ([m, k]) is column-major dw[e]ᵀ ([k, m]) = x[seg]ᵀ · dy[seg], where x[seg]
        // lies as column-major [k, r] and dy[seg] as [m, r] (transposed by cuBLAS).
        gemms.push(Gemm {
            transa: false,
            transb: true,
            m: k,
            n: m,
            k: s[1] - s[0],
            a: px + (s[0] * k) as u64 * es,
            lda: k,
            b: pd + (s[0] * m) as u64 * es,
            ldb: m,
            c,
            ldc: k,
        });
    }
    run(dy, dy.dtype, &zero, &gemms).unwrap_or_else(|e| panic!("cuBLAS grouped matmul weight grad -> [{experts}x{m}x{k}]: {e}"));
    Some(from_cuda(dw))
}
