//! Cube-wide reductions shared by the kernels that reduce through shared memory (the attention
//! softmax's row statistics, the sum of squares of the gradient norm).

use cubecl::prelude::*;

/// Units per cube of the kernels that call [`cube_reduce`] (a power of two: the reduction halves it).
pub const REDUCE_UNITS: u32 = 256;

/// Reduces `value` over the units of the cube (of [`REDUCE_UNITS`] units) through `shared` (as many
/// entries): the maximum when `take_max`, else the sum. Every unit gets the result.
#[cube]
pub(crate) fn cube_reduce(shared: &mut SharedMemory<f32>, value: f32, #[comptime] take_max: bool) -> f32 {
    let u = UNIT_POS as usize;
    shared[u] = value;
    sync_cube();
    // Pairs at growing distances (a literal start: cubecl cannot mutate a variable initialised from
    // a constant expression).
    let mut stride = 1usize;
    while stride < REDUCE_UNITS as usize {
        if u % (2 * stride) == 0 {
            if take_max {
                shared[u] = max(shared[u], shared[u + stride]);
            } else {
                shared[u] += shared[u + stride];
            }
        }
        sync_cube();
        stride *= 2;
    }
    let total = shared[0];
    // Nobody may overwrite `shared[0]` (the next reduction) before every unit has read it.
    sync_cube();
    total
}
