//! Launchers of the fused cross-entropy kernels over one [`CrossEntropyProblem`].

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::CrossEntropyProblem;
use super::kernel::{cross_entropy_backward_kernel, cross_entropy_kernel};
use crate::reduce::{REDUCE_UNITS, row_grid};
use crate::scatter::KernelError;

/// [`cross_entropy_kernel`]: `logits` holds `rows × vocab` values of `F`, `targets` `rows` of `I`;
/// writes `rows` f32 losses to `nll` and log-sum-exps to `lse`.
///
/// # Errors
/// [`KernelError::Shape`] from [`CrossEntropyProblem::check`].
pub fn launch_cross_entropy<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    problem: &CrossEntropyProblem,
    logits: Handle,
    targets: Handle,
    nll: Handle,
    lse: Handle,
) -> Result<(), KernelError> {
    problem.check()?;
    let CrossEntropyProblem { rows, vocab } = *problem;
    if rows == 0 {
        return Ok(());
    }
    // SAFETY: one cube per row (cubes past the last row return at once); a row reads its `vocab`
    // logits inside `rows × vocab`, its target, and writes one loss and one log-sum-exp.
    unsafe {
        cross_entropy_kernel::launch_unchecked::<F, I, R>(
            client,
            row_grid(rows),
            CubeDim::new_1d(REDUCE_UNITS),
            ArrayArg::from_raw_parts(logits, rows * vocab),
            ArrayArg::from_raw_parts(targets, rows),
            ArrayArg::from_raw_parts(nll, rows),
            ArrayArg::from_raw_parts(lse, rows),
            rows,
            vocab,
        );
    }
    Ok(())
}

/// [`cross_entropy_backward_kernel`]: `dlogits` (`rows × vocab` of `F`) from the logits, targets,
/// the forward pass's `lse` and the losses' gradient `dnll` (`rows` f32 each).
///
/// # Errors
/// As [`launch_cross_entropy`].
#[allow(clippy::too_many_arguments)]
pub fn launch_cross_entropy_backward<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    problem: &CrossEntropyProblem,
    logits: Handle,
    targets: Handle,
    lse: Handle,
    dnll: Handle,
    dlogits: Handle,
) -> Result<(), KernelError> {
    problem.check()?;
    let CrossEntropyProblem { rows, vocab } = *problem;
    let len = rows * vocab;
    if len == 0 {
        return Ok(());
    }
    let arg = |h: Handle, n: usize| unsafe { ArrayArg::from_raw_parts(h, n) };
    // SAFETY: the kernel bounds-checks its position against `rows × vocab`, the length of both
    // logit-shaped buffers; the per-row buffers hold `rows` values.
    unsafe {
        cross_entropy_backward_kernel::launch_unchecked::<F, I, R>(
            client,
            cubecl::calculate_cube_count_elemwise(client, len, CubeDim::new_1d(REDUCE_UNITS)),
            CubeDim::new_1d(REDUCE_UNITS),
            arg(logits, len),
            arg(targets, rows),
            arg(lse, rows),
            arg(dnll, rows),
            arg(dlogits, len),
            vocab,
        );
    }
    Ok(())
}
