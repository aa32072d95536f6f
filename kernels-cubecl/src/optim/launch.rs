//! Launcher of the fused AdamW kernel over `len` contiguous elements.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::kernel::{adamw_kernel, sum_squares_kernel};
use crate::reduce::REDUCE_UNITS;
use crate::scatter::KernelError;

const UNITS: u32 = 256;

/// The step's scalars, computed on the host in f32 as burn-optim computes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    /// β₁.
    pub beta_1: f32,
    /// β₂.
    pub beta_2: f32,
    /// ε.
    pub epsilon: f32,
    /// Learning rate of this step.
    pub lr: f32,
    /// `1 − lr·λ` (decoupled weight decay; 1 without).
    pub keep: f32,
    /// The step number `t` (1 for the first update), for the bias corrections.
    pub time: i32,
    /// Factor applied to each gradient before the update (gradient clipping folded into the pass;
    /// 1 leaves the gradients as they are).
    pub grad_scale: f32,
}

impl AdamWHyper {
    /// `[β₁, 1−β₁, β₂, 1−β₂, 1−β₁ᵗ, 1−β₂ᵗ, ε, lr, keep, grad scale]`, the kernel's `hp`.
    pub fn packed(&self) -> [f32; 10] {
        [
            self.beta_1,
            1.0 - self.beta_1,
            self.beta_2,
            1.0 - self.beta_2,
            1.0 - self.beta_1.powi(self.time),
            1.0 - self.beta_2.powi(self.time),
            self.epsilon,
            self.lr,
            self.keep,
            self.grad_scale,
        ]
    }
}

/// One AdamW step over `len` elements of `F`: reads `param`, `grad`, `m`, `v`, writes `param_out`,
/// `m_out`, `v_out` (all `len` elements; outputs may not alias inputs).
///
/// # Errors
/// None today; `Result` keeps the launcher signature of the other kernel families.
#[allow(clippy::too_many_arguments)]
pub fn launch_adamw<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    len: usize,
    hyper: &AdamWHyper,
    param: Handle,
    grad: Handle,
    m: Handle,
    v: Handle,
    param_out: Handle,
    m_out: Handle,
    v_out: Handle,
) -> Result<(), KernelError> {
    if len == 0 {
        return Ok(());
    }
    let hp = client.create_from_slice(f32::as_bytes(&hyper.packed()));
    let count = cubecl::calculate_cube_count_elemwise(client, len, CubeDim::new_1d(UNITS));
    let arg = |h: &Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    // SAFETY: the kernel bounds-checks its position against the output length; every buffer holds
    // `len` elements and `hp` ten.
    unsafe {
        adamw_kernel::launch_unchecked::<F, R>(
            client,
            count,
            CubeDim::new_1d(UNITS),
            arg(&param),
            arg(&grad),
            arg(&m),
            arg(&v),
            ArrayArg::from_raw_parts(hp, 10),
            arg(&param_out),
            arg(&m_out),
            arg(&v_out),
        );
    }
    Ok(())
}

/// Cubes of [`launch_sum_squares`] for `len` elements: at least eight elements per unit, at most
/// `MAX_SUM_SQUARES_CUBES` cubes (about eight resident cubes per multiprocessor of an H100/H200, so
/// the loads keep the memory busy while the partials stay few).
pub fn sum_squares_cubes(len: usize) -> usize {
    len.div_ceil(REDUCE_UNITS as usize * 8).clamp(1, MAX_SUM_SQUARES_CUBES)
}

const MAX_SUM_SQUARES_CUBES: usize = 1024;

/// Partial sums of squares of `len` elements of `F` into `partials` (`sum_squares_cubes(len)` f32
/// values, each the sum over one cube's share; their sum is `Σ x²`).
///
/// # Errors
/// None today; `Result` keeps the launcher signature of the other kernel families.
pub fn launch_sum_squares<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    len: usize,
    input: Handle,
    partials: Handle,
) -> Result<(), KernelError> {
    if len == 0 {
        return Ok(());
    }
    let cubes = sum_squares_cubes(len);
    let stride = cubes * REDUCE_UNITS as usize;
    // SAFETY: each unit reads `input` only below `len` (the buffer's length) and unit 0 of cube `c`
    // writes `partials[c]`, `c < cubes` (the buffer's length).
    unsafe {
        sum_squares_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d(REDUCE_UNITS),
            ArrayArg::from_raw_parts(input, len),
            ArrayArg::from_raw_parts(partials, cubes),
            len,
            stride,
        );
    }
    Ok(())
}
