//! CUDA driver plumbing shared by the NCCL collectives and the cuBLAS GEMMs, which both run on streams of
//! their own beside CubeCL's.

use cudarc::driver::{result as cu, sys as cusys};

/// Retains the primary context of CUDA device `ordinal` (the one CubeCL uses) and makes it current on
/// this thread.
pub(crate) fn activate_primary_context(ordinal: usize) -> Result<cusys::CUcontext, String> {
    // SAFETY: plain driver calls; the retained context is never released while its users live.
    unsafe {
        cu::init().map_err(|e| format!("cuInit: {e:?}"))?;
        let dev = cu::device::get(ordinal as i32).map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
        let ctx = cu::primary_ctx::retain(dev).map_err(|e| format!("primary context of device {ordinal}: {e:?}"))?;
        cu::ctx::set_current(ctx).map_err(|e| format!("cuCtxSetCurrent: {e:?}"))?;
        Ok(ctx)
    }
}

/// Waits until `stream` has run everything queued on it by polling it, calling `ping` between polls.
///
/// Why not one blocking `cuStreamSynchronize`: while this thread sleeps in it, CubeCL's device
/// thread goes to sleep too, and the next Burn call after the wait pays its wake-up — 30–200 µs
/// measured on an H200 after waits of ≥ 150 µs (BENCHMARKS.md, issue 5's NCCL section). Callers pass
/// an empty `B::sync` as `ping`, a round trip that keeps that thread awake.
///
/// # Safety
/// `stream` must be a live stream of the current context.
pub(crate) unsafe fn wait_stream_warm(stream: cusys::CUstream, mut ping: impl FnMut()) -> Result<(), cudarc::driver::DriverError> {
    loop {
        // SAFETY: the caller's stream.
        match unsafe { cusys::cuStreamQuery(stream) } {
            cusys::CUresult::CUDA_ERROR_NOT_READY => ping(),
            other => return other.result(),
        }
    }
}
