//! Launchers of the causal-attention softmax kernels over one block of score rows.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::kernel::{SOFTMAX_UNITS, attention_softmax_backward_kernel, attention_softmax_kernel};
use super::SoftmaxBlock;
use crate::reduce::row_grid;
use crate::scatter::KernelError;

/// [`attention_softmax_kernel`] over `block`: `scores` holds `rows × keys` values of `F`; writes as
/// many probabilities to `probs` and `rows` f32 log-sum-exps to `lse`.
///
/// # Errors
/// [`KernelError::Shape`] when a visible key range would be empty or the block is not causal
/// ([`SoftmaxBlock::check`]).
pub fn launch_attention_softmax<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    block: &SoftmaxBlock,
    scores: Handle,
    probs: Handle,
    lse: Handle,
) -> Result<(), KernelError> {
    block.check()?;
    if block.rows == 0 {
        return Ok(());
    }
    let len = block.rows * block.keys;
    let count = row_grid(block.rows);
    // SAFETY: one cube per row (cubes past the last row return at once); every row reads and writes
    // `keys` values inside `rows × keys`, and one log-sum-exp.
    unsafe {
        attention_softmax_kernel::launch_unchecked::<F, R>(
            client,
            count,
            CubeDim::new_1d(SOFTMAX_UNITS),
            ArrayArg::from_raw_parts(scores, len),
            ArrayArg::from_raw_parts(probs, len),
            ArrayArg::from_raw_parts(lse, block.rows),
            block.rows,
            block.keys,
            block.queries,
            block.first_query,
            block.first_key,
            block.scale as f32,
            block.window.unwrap_or(0),
        );
    }
    Ok(())
}

/// [`attention_softmax_backward_kernel`] over `block`: reads `scores` and `dprobs` (`rows × keys`
/// values of `F`), `lse` and `correction` (`rows` f32 each); writes `probs` and `dscores`.
///
/// # Errors
/// As [`launch_attention_softmax`].
#[allow(clippy::too_many_arguments)]
pub fn launch_attention_softmax_backward<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    block: &SoftmaxBlock,
    scores: Handle,
    dprobs: Handle,
    lse: Handle,
    correction: Handle,
    probs: Handle,
    dscores: Handle,
) -> Result<(), KernelError> {
    block.check()?;
    let len = block.rows * block.keys;
    if len == 0 {
        return Ok(());
    }
    let count = cubecl::calculate_cube_count_elemwise(client, len, CubeDim::new_1d(SOFTMAX_UNITS));
    let arg = |h: Handle, n: usize| unsafe { ArrayArg::from_raw_parts(h, n) };
    // SAFETY: the kernel bounds-checks its position against `rows × keys`, the length of every
    // score-shaped buffer; `lse` and `correction` hold one value per row.
    unsafe {
        attention_softmax_backward_kernel::launch_unchecked::<F, R>(
            client,
            count,
            CubeDim::new_1d(SOFTMAX_UNITS),
            arg(scores, len),
            arg(dprobs, len),
            arg(lse, block.rows),
            arg(correction, block.rows),
            arg(probs, len),
            arg(dscores, len),
            block.keys,
            block.queries,
            block.first_query,
            block.first_key,
            block.scale as f32,
            block.window.unwrap_or(0),
        );
    }
    Ok(())
}
