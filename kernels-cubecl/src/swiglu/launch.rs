//! Launchers of the SwiGLU kernels over `len` elements stored contiguously.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::kernel::{swiglu_backward_kernel, swiglu_kernel};
use crate::scatter::KernelError;

const UNITS: u32 = 256;

/// The widest vector (8, 4, 2 or 1 elements, at most 16 bytes) that divides `len` and the runtime
/// supports.
pub fn swiglu_vector_size<R: Runtime, F: CubeElement>(client: &ComputeClient<R>, len: usize) -> usize {
    let max = client.properties().hardware.max_vector_size.min(16 / std::mem::size_of::<F>().max(1));
    [8usize, 4, 2, 1].into_iter().find(|&n| n <= max && len.is_multiple_of(n)).unwrap_or(1)
}

fn grid<R: Runtime>(client: &ComputeClient<R>, units: usize) -> CubeCount {
    cubecl::calculate_cube_count_elemwise(client, units, CubeDim::new_1d(UNITS))
}

/// `out = silu(gate) · up` over `len` elements of `F` (bf16, f16 or f32).
///
/// # Errors
/// None today; `Result` keeps the launcher signature of the other kernel families.
pub fn launch_swiglu<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    len: usize,
    gate: Handle,
    up: Handle,
    out: Handle,
) -> Result<(), KernelError> {
    if len == 0 {
        return Ok(());
    }
    let n = swiglu_vector_size::<R, F>(client, len);
    let count = grid(client, len / n);
    // The length is given in elements; a vectorised array's `len()` in the kernel counts vectors.
    let arg = |h: &Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    // SAFETY: the kernel bounds-checks its position against the output length; every buffer holds
    // `len` elements.
    unsafe {
        swiglu_kernel::launch_unchecked::<F, R>(client, count, CubeDim::new_1d(UNITS), n, arg(&gate), arg(&up), arg(&out));
    }
    Ok(())
}

/// `d_gate`, `d_up` of [`launch_swiglu`] for the output gradient `dh`, over `len` elements.
///
/// # Errors
/// None today; `Result` keeps the launcher signature of the other kernel families.
pub fn launch_swiglu_backward<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    len: usize,
    gate: Handle,
    up: Handle,
    dh: Handle,
    d_gate: Handle,
    d_up: Handle,
) -> Result<(), KernelError> {
    if len == 0 {
        return Ok(());
    }
    let n = swiglu_vector_size::<R, F>(client, len);
    let count = grid(client, len / n);
    let arg = |h: &Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    // SAFETY: as in `launch_swiglu`.
    unsafe {
        swiglu_backward_kernel::launch_unchecked::<F, R>(
            client,
            count,
            CubeDim::new_1d(UNITS),
            n,
            arg(&gate),
            arg(&up),
            arg(&dh),
            arg(&d_gate),
            arg(&d_up),
        );
    }
    Ok(())
}
