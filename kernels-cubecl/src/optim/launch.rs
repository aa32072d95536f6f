//! Launcher of the fused AdamW kernel over `len` contiguous elements.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::kernel::adamw_kernel;
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
}

impl AdamWHyper {
    /// `[β₁, 1−β₁, β₂, 1−β₂, 1−β₁ᵗ, 1−β₂ᵗ, ε, lr, keep]`, the kernel's `hp`.
    pub fn packed(&self) -> [f32; 9] {
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
    // `len` elements and `hp` nine.
    unsafe {
        adamw_kernel::launch_unchecked::<F, R>(
            client,
            count,
            CubeDim::new_1d(UNITS),
            arg(&param),
            arg(&grad),
            arg(&m),
            arg(&v),
            ArrayArg::from_raw_parts(hp, 9),
            arg(&param_out),
            arg(&m_out),
            arg(&v_out),
        );
    }
    Ok(())
}
