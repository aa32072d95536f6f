//! Launchers of the router-gate kernels over one [`GateProblem`].

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::GateProblem;
use super::kernel::{gate_logits_kernel, gate_weight_grad_finish_kernel, gate_weight_grad_kernel};
use crate::reduce::{MAX_CUBES_X, REDUCE_UNITS, row_grid, row_vector_size};
use crate::scatter::KernelError;

/// Most gate rows the kernels take: each unit keeps `experts` vector sums in registers.
pub const GATE_MAX_EXPERTS: usize = 16;

/// Units per cube of the weight gradient's column kernel.
const COLUMN_UNITS: u32 = 64;
/// Cubes the weight gradient's partial sums aim at (about eight per multiprocessor on an H100/H200),
/// and the fewest rows a chunk sums.
const TARGET_CUBES: usize = 1024;
const MIN_CHUNK_ROWS: usize = 16;

/// [`gate_logits_kernel`]: `out` (`tokens × experts` of `F`) `= x · gateᵀ` for `x` (`tokens × dim`)
/// and `gate` (`experts × dim`), row-major.
///
/// # Errors
/// [`KernelError::Shape`] from [`GateProblem::check`].
pub fn launch_gate_logits<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &GateProblem,
    x: Handle,
    gate: Handle,
    out: Handle,
) -> Result<(), KernelError> {
    problem.check()?;
    let GateProblem { tokens, dim, experts } = *problem;
    if tokens == 0 {
        return Ok(());
    }
    let v = row_vector_size::<R, F>(client, dim, &[&x, &gate]);
    // SAFETY: a cube per token (cubes past the last return at once); a token reads its row of `x`
    // and the whole gate, and writes its `experts` logits.
    unsafe {
        gate_logits_kernel::launch_unchecked::<F, R>(
            client,
            row_grid(tokens),
            CubeDim::new_1d(REDUCE_UNITS),
            v,
            ArrayArg::from_raw_parts(x, tokens * dim),
            ArrayArg::from_raw_parts(gate, experts * dim),
            ArrayArg::from_raw_parts(out, tokens * experts),
            tokens,
            dim / v,
            experts,
        );
    }
    Ok(())
}

/// [`gate_weight_grad_kernel`] and its finish: `dgate` (`experts × dim` of `F`) `= dlogitsᵀ · x` for
/// `dlogits` (`tokens × experts`) and `x` (`tokens × dim`). Allocates the f32 partial sums.
///
/// # Errors
/// [`KernelError::Shape`] from [`GateProblem::check`].
pub fn launch_gate_weight_grad<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &GateProblem,
    dlogits: Handle,
    x: Handle,
    dgate: Handle,
) -> Result<(), KernelError> {
    problem.check()?;
    let GateProblem { tokens, dim, experts } = *problem;
    if dim == 0 {
        return Ok(());
    }
    let v = row_vector_size::<R, F>(client, dim, &[&x, &dgate]);
    let vectors = dim / v;
    let col_blocks = vectors.div_ceil(COLUMN_UNITS as usize);
    let chunk = tokens.div_ceil((TARGET_CUBES / col_blocks).max(1)).max(MIN_CHUNK_ROWS);
    let chunks = tokens.div_ceil(chunk).max(1);
    if col_blocks > MAX_CUBES_X || chunks > MAX_CUBES_X {
        return Err(KernelError::Shape(format!("gate gradient of {tokens} x {dim}: {col_blocks} x {chunks} cubes exceed the grid")));
    }
    let len = experts * vectors;
    // No tokens: a zero gradient, from the finish kernel summing no chunks (the column kernel would
    // bind empty inputs).
    let chunks = if tokens == 0 { 0 } else { chunks };
    let partials = client.empty(chunks.max(1) * len * v * 4);
    // SAFETY: units past the last column vector return at once; chunk `y` reads rows
    // `y · chunk .. min(tokens, (y + 1) · chunk)` and writes its own `experts × vectors` partials.
    unsafe {
        if chunks > 0 {
            gate_weight_grad_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static(col_blocks as u32, chunks as u32, 1),
                CubeDim::new_1d(COLUMN_UNITS),
                v,
                ArrayArg::from_raw_parts(dlogits, tokens * experts),
                ArrayArg::from_raw_parts(x, tokens * dim),
                ArrayArg::from_raw_parts(partials.clone(), chunks * len * v),
                tokens,
                vectors,
                chunk,
                experts,
            );
        }
        gate_weight_grad_finish_kernel::launch_unchecked::<F, R>(
            client,
            cubecl::calculate_cube_count_elemwise(client, len, CubeDim::new_1d(COLUMN_UNITS)),
            CubeDim::new_1d(COLUMN_UNITS),
            v,
            ArrayArg::from_raw_parts(partials, chunks.max(1) * len * v),
            ArrayArg::from_raw_parts(dgate, experts * dim),
            len,
            chunks,
        );
    }
    Ok(())
}
