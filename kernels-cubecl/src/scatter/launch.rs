//! Launch functions: validate a data-free problem description, pick the grid, launch.
//!
//! Buffers are raw CubeCL handles holding contiguous row-major data of the element type `F` (indices
//! and offsets are `u32`). Callers (the Burn backend) choose `F` from each tensor's runtime dtype.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::kernel::{combine_kernel, grouped_matmul_kernel, grouped_matmul_weight_grad_kernel, permute_kernel};

/// Threads per cube for the element-wise style kernels.
const CUBE_THREADS: u32 = 256;

/// A launch that cannot run as described.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// The element type is not one the kernels are compiled for.
    #[error("unsupported element type {0} (supported: f32, f16, bf16)")]
    UnsupportedDtype(String),
    /// Sizes that do not fit together.
    #[error("{0}")]
    Shape(String),
}

/// A grouped matmul over expert segments, without data.
///
/// `rows` sorted rows of width `k` are multiplied segment by segment with `num_experts` matrices:
/// `y = x · w[e]ᵀ` with `w: [E, m, k]` (`transpose`), or `y = x · w[e]` with `w: [E, k, m]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedMatmulProblem {
    /// Rows of `x` and `y` (`offsets[E]`).
    pub rows: usize,
    /// Output width.
    pub m: usize,
    /// Inner (reduction) width.
    pub k: usize,
    /// Number of segments / matrices.
    pub num_experts: usize,
    /// Whether each `w[e]` is stored `[m, k]` (and used transposed).
    pub transpose: bool,
}

impl GroupedMatmulProblem {
    /// Checks the sizes against host offsets (`E + 1` entries, non-decreasing, ending at `rows`).
    ///
    /// # Errors
    /// [`KernelError::Shape`] naming the mismatch.
    pub fn validate(&self, offsets: &[usize]) -> Result<(), KernelError> {
        if offsets.len() != self.num_experts + 1 {
            return Err(KernelError::Shape(format!(
                "offsets has {} entries, expected num_experts + 1 = {}",
                offsets.len(),
                self.num_experts + 1
            )));
        }
        if offsets.windows(2).any(|w| w[0] > w[1]) || offsets[0] != 0 || offsets[self.num_experts] != self.rows {
            return Err(KernelError::Shape(format!(
                "offsets {offsets:?} must rise from 0 to rows = {}",
                self.rows
            )));
        }
        Ok(())
    }
}

fn cube_dim() -> CubeDim {
    CubeDim::new_1d(CUBE_THREADS)
}

/// `out[i] = x[rows[i]]` for `n` rows of width `cols`.
pub fn launch_permute<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    x: Handle,
    x_rows: usize,
    rows: Handle,
    n: usize,
    cols: usize,
    out: Handle,
) {
    if n * cols == 0 {
        return;
    }
    let count = cubecl::calculate_cube_count_elemwise(client, n * cols, cube_dim());
    unsafe {
        permute_kernel::launch::<F, I, R>(
            client,
            count,
            cube_dim(),
            ArrayArg::from_raw_parts(x, x_rows * cols),
            ArrayArg::from_raw_parts(rows, n),
            ArrayArg::from_raw_parts(out, n * cols),
            cols,
        );
    }
}

/// Grouped matmul; `offsets` is a device buffer of `E + 1` `u32` matching `host_offsets`.
///
/// # Errors
/// [`KernelError::Shape`] when the problem and offsets disagree.
#[allow(clippy::too_many_arguments)]
pub fn launch_grouped_matmul<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &GroupedMatmulProblem,
    host_offsets: &[usize],
    x: Handle,
    w: Handle,
    offsets: Handle,
    out: Handle,
) -> Result<(), KernelError> {
    problem.validate(host_offsets)?;
    let p = problem;
    let total = p.rows * p.m;
    if total == 0 {
        return Ok(());
    }
    let count = cubecl::calculate_cube_count_elemwise(client, total, cube_dim());
    unsafe {
        grouped_matmul_kernel::launch::<F, R>(
            client,
            count,
            cube_dim(),
            ArrayArg::from_raw_parts(x, p.rows * p.k),
            ArrayArg::from_raw_parts(w, p.num_experts * p.m * p.k),
            ArrayArg::from_raw_parts(offsets, p.num_experts + 1),
            ArrayArg::from_raw_parts(out, total),
            p.m,
            p.k,
            p.num_experts,
            p.transpose,
        );
    }
    Ok(())
}

/// Weight gradient `dw[e] = dy[seg e]ᵀ · x[seg e]` into `dw: [E, m, k]` (every element written).
///
/// # Errors
/// [`KernelError::Shape`] when the problem and offsets disagree.
#[allow(clippy::too_many_arguments)]
pub fn launch_grouped_matmul_weight_grad<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &GroupedMatmulProblem,
    host_offsets: &[usize],
    dy: Handle,
    x: Handle,
    offsets: Handle,
    dw: Handle,
) -> Result<(), KernelError> {
    problem.validate(host_offsets)?;
    let p = problem;
    let total = p.num_experts * p.m * p.k;
    if total == 0 {
        return Ok(());
    }
    let count = cubecl::calculate_cube_count_elemwise(client, total, cube_dim());
    unsafe {
        grouped_matmul_weight_grad_kernel::launch::<F, R>(
            client,
            count,
            cube_dim(),
            ArrayArg::from_raw_parts(dy, (p.rows * p.m).max(1)),
            ArrayArg::from_raw_parts(x, (p.rows * p.k).max(1)),
            ArrayArg::from_raw_parts(offsets, p.num_experts + 1),
            ArrayArg::from_raw_parts(dw, total),
            p.m,
            p.k,
        );
    }
    Ok(())
}

/// `out[t] = Σ_j weights[t, j] · y[slots[t·k + j]]` for `tokens` rows of width `cols`.
#[allow(clippy::too_many_arguments)]
pub fn launch_combine<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    y: Handle,
    y_rows: usize,
    slots: Handle,
    weights: Handle,
    tokens: usize,
    top_k: usize,
    cols: usize,
    out: Handle,
) {
    let total = tokens * cols;
    if total == 0 {
        return;
    }
    let count = cubecl::calculate_cube_count_elemwise(client, total, cube_dim());
    unsafe {
        combine_kernel::launch::<F, I, R>(
            client,
            count,
            cube_dim(),
            ArrayArg::from_raw_parts(y, y_rows * cols),
            ArrayArg::from_raw_parts(slots, tokens * top_k),
            ArrayArg::from_raw_parts(weights, tokens * top_k),
            ArrayArg::from_raw_parts(out, total),
            cols,
            top_k,
        );
    }
}
