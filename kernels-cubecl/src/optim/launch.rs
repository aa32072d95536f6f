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

/// The buffers of one AdamW update ([`launch_adamw`]): the parameter and both moments of `F`, the
/// gradient of `G`, and optionally a compute copy of the new parameter in `H`.
#[derive(Debug, Clone)]
pub struct AdamWBuffers {
    /// Parameter, gradient, first and second moment (read).
    pub param: Handle,
    /// The gradient (its own element type `G`).
    pub grad: Handle,
    /// First moment.
    pub m: Handle,
    /// Second moment.
    pub v: Handle,
    /// New parameter, first and second moment (written; may not alias the inputs).
    pub param_out: Handle,
    /// New first moment.
    pub m_out: Handle,
    /// New second moment.
    pub v_out: Handle,
    /// The new parameter rounded to `H` (the next step's compute copy), when wanted.
    pub copy_out: Option<Handle>,
}

/// Elements per vector of the update: the widest of 4, 2, 1 that divides `len` and to which every
/// buffer's start is aligned (a parameter can be a view into a larger buffer), given as `(buffer,
/// element bytes)`. Four: sixteen bytes of f32, the widest load.
pub fn adamw_vector_size(len: usize, buffers: &[(&Handle, usize)]) -> usize {
    crate::reduce::narrow_vector_size(4, len, buffers)
}

/// One AdamW step over `len` elements: reads `param`, `m`, `v` (of `F`) and `grad` (of `G`: a bf16 or
/// f16 gradient of f32 weights is widened in the pass), writes the new parameter and moments (of `F`)
/// and, with `copy_out`, the new parameter rounded to `H` (the compute copy of mixed precision).
///
/// # Errors
/// None today; `Result` keeps the launcher signature of the other kernel families.
pub fn launch_adamw<R: Runtime, F: Float + CubeElement, G: Float + CubeElement, H: Float + CubeElement>(
    client: &ComputeClient<R>,
    len: usize,
    hyper: &AdamWHyper,
    buffers: AdamWBuffers,
) -> Result<(), KernelError> {
    if len == 0 {
        return Ok(());
    }
    let AdamWBuffers { param, grad, m, v, param_out, m_out, v_out, copy_out } = buffers;
    let (f, g, h) = (std::mem::size_of::<F>(), std::mem::size_of::<G>(), std::mem::size_of::<H>());
    let with_copy = copy_out.is_some();
    // Without a copy the kernel still takes the argument (a comptime flag skips the store): any
    // buffer of `H` elements will do.
    let copy = copy_out.unwrap_or_else(|| client.empty(h.max(1) * 4));
    let mut aligned = vec![(&param, f), (&grad, g), (&m, f), (&v, f), (&param_out, f), (&m_out, f), (&v_out, f)];
    if with_copy {
        aligned.push((&copy, h));
    }
    let n = adamw_vector_size(len, &aligned);
    let hp = client.create_from_slice(f32::as_bytes(&hyper.packed()));
    let count = cubecl::calculate_cube_count_elemwise(client, len / n, CubeDim::new_1d(UNITS));
    // The length is given in elements; the kernel counts vectors.
    let arg = |h: &Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
    let copy_len = if with_copy { len } else { n };
    // SAFETY: the kernel bounds-checks its vector index against `len / n`; every buffer holds `len`
    // elements (the unused copy buffer is written only with `with_copy`) and `hp` ten.
    unsafe {
        adamw_kernel::launch_unchecked::<F, G, H, R>(
            client,
            count,
            CubeDim::new_1d(UNITS),
            n,
            arg(&param),
            arg(&grad),
            arg(&m),
            arg(&v),
            ArrayArg::from_raw_parts(hp, 10),
            arg(&param_out),
            arg(&m_out),
            arg(&v_out),
            ArrayArg::from_raw_parts(copy, copy_len),
            len / n,
            with_copy,
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
    let n = crate::reduce::row_vector_size::<R, F>(client, len, &[&input]);
    // SAFETY: each unit reads `input` only below `len / n` vectors (the buffer's length) and unit 0
    // of cube `c` writes `partials[c]`, `c < cubes` (the buffer's length).
    unsafe {
        sum_squares_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d(REDUCE_UNITS),
            n,
            ArrayArg::from_raw_parts(input, len),
            ArrayArg::from_raw_parts(partials, cubes),
            len / n,
            stride,
        );
    }
    Ok(())
}
