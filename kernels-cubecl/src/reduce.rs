//! Cube-wide reductions shared by the kernels that reduce through shared memory (the attention
//! softmax's row statistics, the sum of squares of the gradient norm, RMSNorm, the cross-entropy,
//! the combine's backward), the grid of the kernels that give each row a cube, and the vector width
//! of the kernels that walk rows in vectors.

use cubecl::prelude::*;
use cubecl::server::Handle;

/// Units per cube of the kernels that call [`cube_reduce`] (a power of two: the reduction halves it).
pub const REDUCE_UNITS: u32 = 256;

/// Cubes along x per grid row: every runtime allows 65 535 (wgpu's limit), so more go to y.
pub(crate) const MAX_CUBES_X: usize = 65_535;

/// A grid of `rows` cubes (x first, then y rows of [`MAX_CUBES_X`]); the kernels number their cube
/// linearly (`CUBE_POS`) and return at once past the last row.
pub(crate) fn row_grid(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_CUBES_X);
    CubeCount::Static(x as u32, rows.div_ceil(x) as u32, 1)
}

/// The widest vector (8, 4, 2 or 1 elements, at most 16 bytes, dividing `cols`) for kernels that walk
/// rows of `cols` values in vectors, narrowed until every buffer's start is aligned to it (a tensor can
/// be a view starting inside its buffer).
pub(crate) fn row_vector_size<R: Runtime, F: CubeElement>(client: &ComputeClient<R>, cols: usize, buffers: &[&Handle]) -> usize {
    let elem = std::mem::size_of::<F>();
    let buffers: Vec<(&Handle, usize)> = buffers.iter().map(|&h| (h, elem)).collect();
    narrow_vector_size(crate::swiglu::swiglu_vector_size::<R, F>(client, cols), cols, &buffers)
}

/// Halves the vector width `v` (a power of two) until it divides `len` and every buffer's start is
/// aligned to `v` of its elements (`(buffer, element bytes)`; buffers of different element types, as
/// in the optimizer's update, are each checked at their own width).
pub(crate) fn narrow_vector_size(mut v: usize, len: usize, buffers: &[(&Handle, usize)]) -> usize {
    while v > 1 && (!len.is_multiple_of(v) || buffers.iter().any(|(h, e)| !h.offset_start.unwrap_or(0).is_multiple_of((v * e) as u64))) {
        v /= 2;
    }
    v
}

/// Reduces `value` over the units of the cube (of [`REDUCE_UNITS`] units) through `shared` (as many
/// entries): the maximum when `take_max`, else the sum. Every unit gets the result.
#[cube]
pub(crate) fn cube_reduce(shared: &mut SharedMemory<f32>, value: f32, #[comptime] take_max: bool) -> f32 {
    shared[UNIT_POS as usize] = value;
    sync_cube();
    cube_reduce_rows(shared, 1usize, take_max);
    let total = shared[0];
    // Nobody may overwrite `shared[0]` (the next reduction) before every unit has read it.
    sync_cube();
    total
}

/// Reduces each of the `rows` rows of [`REDUCE_UNITS`] values in `shared` (every unit has written its
/// entry of each row, and the cube synced) in place, all rows in the same steps: afterwards
/// `shared[r · REDUCE_UNITS]` holds row `r`'s maximum when `take_max`, else its sum.
#[cube]
pub(crate) fn cube_reduce_rows(shared: &mut SharedMemory<f32>, #[comptime] rows: usize, #[comptime] take_max: bool) {
    let u = UNIT_POS as usize;
    let units = REDUCE_UNITS as usize;
    // Pairs at growing distances (a literal start: cubecl cannot mutate a variable initialised from
    // a constant expression).
    let mut stride = 1usize;
    while stride < units {
        if u % (2 * stride) == 0 {
            #[unroll]
            for r in 0..rows {
                let i = r * units + u;
                if take_max {
                    shared[i] = max(shared[i], shared[i + stride]);
                } else {
                    shared[i] += shared[i + stride];
                }
            }
        }
        sync_cube();
        stride *= 2;
    }
}
