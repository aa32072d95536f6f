//! Launchers of the RMSNorm kernels over one [`RmsNormProblem`].

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::RmsNormProblem;
use super::kernel::{rms_norm_backward_kernel, rms_norm_kernel, rms_norm_weight_grad_finish_kernel, rms_norm_weight_grad_kernel};
use crate::reduce::{MAX_CUBES_X, REDUCE_UNITS, row_grid};
use crate::scatter::KernelError;

/// Units per cube of the column kernels of the weight gradient.
const COLUMN_UNITS: u32 = 256;

/// Cubes the weight gradient's partial sums aim at: enough to keep an H100/H200 busy (about eight
/// per multiprocessor) while the partials stay a few MB.
const TARGET_CUBES: usize = 1024;

/// Fewest rows a weight-gradient chunk sums, so small problems do not spread over many partials.
const MIN_CHUNK_ROWS: usize = 16;

/// `(chunk rows, chunks)` of the weight gradient of `problem`: the rows split so that column blocks
/// × chunks is about [`TARGET_CUBES`], each chunk at least [`MIN_CHUNK_ROWS`] rows.
pub fn weight_grad_chunks(problem: &RmsNormProblem) -> (usize, usize) {
    let col_blocks = problem.dim.div_ceil(COLUMN_UNITS as usize).max(1);
    let chunks_wanted = (TARGET_CUBES / col_blocks).max(1);
    let chunk = problem.rows.div_ceil(chunks_wanted).max(MIN_CHUNK_ROWS);
    (chunk, problem.rows.div_ceil(chunk).max(1))
}

/// [`rms_norm_kernel`]: `x` holds `rows × dim` values of `F`, `weight` `dim`; writes `y` (as `x`) and
/// `rstd` (`rows` f32).
///
/// # Errors
/// [`KernelError::Shape`] from [`RmsNormProblem::check`].
pub fn launch_rms_norm<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &RmsNormProblem,
    x: Handle,
    weight: Handle,
    y: Handle,
    rstd: Handle,
) -> Result<(), KernelError> {
    problem.check()?;
    let RmsNormProblem { rows, dim, eps } = *problem;
    if rows == 0 {
        return Ok(());
    }
    let len = rows * dim;
    // SAFETY: one cube per row (cubes past the last row return at once); a row reads and writes `dim`
    // values inside `rows × dim`, the scale's `dim`, and one `rstd`.
    unsafe {
        rms_norm_kernel::launch_unchecked::<F, R>(
            client,
            row_grid(rows),
            CubeDim::new_1d(REDUCE_UNITS),
            ArrayArg::from_raw_parts(x, len),
            ArrayArg::from_raw_parts(weight, dim),
            ArrayArg::from_raw_parts(y, len),
            ArrayArg::from_raw_parts(rstd, rows),
            rows,
            dim,
            1.0 / dim as f32,
            eps,
        );
    }
    Ok(())
}

/// [`rms_norm_backward_kernel`]: the input gradient `dx` (`rows × dim` of `F`) from `x`, `weight`,
/// the forward pass's `rstd` and the output gradient `dy`.
///
/// # Errors
/// As [`launch_rms_norm`].
#[allow(clippy::too_many_arguments)]
pub fn launch_rms_norm_backward<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &RmsNormProblem,
    x: Handle,
    weight: Handle,
    rstd: Handle,
    dy: Handle,
    dx: Handle,
) -> Result<(), KernelError> {
    problem.check()?;
    let RmsNormProblem { rows, dim, .. } = *problem;
    if rows == 0 {
        return Ok(());
    }
    let len = rows * dim;
    let arg = |h: Handle, n: usize| unsafe { ArrayArg::from_raw_parts(h, n) };
    // SAFETY: as in `launch_rms_norm`.
    unsafe {
        rms_norm_backward_kernel::launch_unchecked::<F, R>(
            client,
            row_grid(rows),
            CubeDim::new_1d(REDUCE_UNITS),
            arg(x, len),
            arg(weight, dim),
            arg(rstd, rows),
            arg(dy, len),
            arg(dx, len),
            rows,
            dim,
            1.0 / dim as f32,
        );
    }
    Ok(())
}

/// The weight gradient `dw` (`dim` values of `F`, zero when there are no rows) from `x`, the forward
/// pass's `rstd` and the output gradient `dy`: partial sums per row chunk
/// ([`rms_norm_weight_grad_kernel`], f32, in a buffer allocated here), then their sum
/// ([`rms_norm_weight_grad_finish_kernel`]). Deterministic: no atomics.
///
/// # Errors
/// As [`launch_rms_norm`], and [`KernelError::Shape`] for more than 65 535 × 256 columns.
pub fn launch_rms_norm_weight_grad<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &RmsNormProblem,
    x: Handle,
    rstd: Handle,
    dy: Handle,
    dw: Handle,
) -> Result<(), KernelError> {
    problem.check()?;
    let RmsNormProblem { rows, dim, .. } = *problem;
    if dim == 0 {
        return Ok(());
    }
    let col_blocks = dim.div_ceil(COLUMN_UNITS as usize);
    if col_blocks > MAX_CUBES_X {
        return Err(KernelError::Shape(format!("RMSNorm weight gradient of {dim} columns: more than {} column blocks", MAX_CUBES_X)));
    }
    let (chunk, chunks) = weight_grad_chunks(problem);
    let len = rows * dim;
    let partials = client.empty(chunks * dim * std::mem::size_of::<f32>());
    let arg = |h: Handle, n: usize| unsafe { ArrayArg::from_raw_parts(h, n.max(1)) };
    // SAFETY: unit (column block, chunk) reads column `c < dim` of rows `< rows` and writes one
    // partial inside `chunks × dim`; the finishing units read `chunks` partials of their column.
    // With no rows every partial is written as zero (empty chunk), so `dw` is zero.
    unsafe {
        rms_norm_weight_grad_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(col_blocks as u32, chunks as u32, 1),
            CubeDim::new_1d(COLUMN_UNITS),
            arg(x, len),
            arg(rstd, rows),
            arg(dy, len),
            arg(partials.clone(), chunks * dim),
            rows,
            dim,
            chunk,
        );
        rms_norm_weight_grad_finish_kernel::launch_unchecked::<F, R>(
            client,
            cubecl::calculate_cube_count_elemwise(client, dim, CubeDim::new_1d(COLUMN_UNITS)),
            CubeDim::new_1d(COLUMN_UNITS),
            arg(partials, chunks * dim),
            arg(dw, dim),
            dim,
            chunks,
        );
    }
    Ok(())
}
