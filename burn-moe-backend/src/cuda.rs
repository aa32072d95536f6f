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
