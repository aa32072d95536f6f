//! The fused AdamW kernel (one thread per element) and the sum of squares of the gradient norm (one
//! pass, partial sums per cube); math in f32 whatever the storage.

use cubecl::prelude::*;

use crate::reduce::{REDUCE_UNITS, cube_reduce};

/// One AdamW step of every element, burn-optim's formula in its order of operations:
/// `m' = m·β₁ + g·(1−β₁)`, `v' = v·β₂ + g²·(1−β₂)`,
/// `p' = p·keep − lr · (m'/c₁) / (√(v'/c₂) + ε)` with `keep = 1 − lr·λ`, `cᵢ = 1 − βᵢᵗ`.
/// `g` is the stored gradient times `hp[9]` (the gradient-clipping factor, 1 without clipping).
/// `hp` holds `[β₁, 1−β₁, β₂, 1−β₂, c₁, c₂, ε, lr, keep, grad scale]` (see `AdamWHyper`).
#[cube(launch_unchecked)]
pub fn adamw_kernel<F: Float>(
    param: &Array<F>,
    grad: &Array<F>,
    m: &Array<F>,
    v: &Array<F>,
    hp: &Array<f32>,
    param_out: &mut Array<F>,
    m_out: &mut Array<F>,
    v_out: &mut Array<F>,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= param_out.len() {
        terminate!();
    }
    let g = f32::cast_from(grad[pos]) * hp[9];
    let m1 = f32::cast_from(m[pos]) * hp[0] + g * hp[1];
    let v1 = f32::cast_from(v[pos]) * hp[2] + g * g * hp[3];
    let delta = (m1 / hp[4]) / (f32::sqrt(v1 / hp[5]) + hp[6]);
    let p = f32::cast_from(param[pos]) * hp[8] - delta * hp[7];
    param_out[pos] = F::cast_from(p);
    m_out[pos] = F::cast_from(m1);
    v_out[pos] = F::cast_from(v1);
}

/// Partial sums of squares (in f32) of `input`'s `len` elements: cube `c` of the grid's `cubes`
/// (of [`REDUCE_UNITS`] units each) adds `x²` over the elements `c·REDUCE_UNITS + u + j·stride`
/// (`stride = cubes · REDUCE_UNITS`) and writes its sum to `partials[c]`. One pass over the input,
/// nothing else written: the gradient norm's `Σ g²` without the squared tensor.
#[cube(launch_unchecked)]
pub fn sum_squares_kernel<F: Float>(input: &Array<F>, partials: &mut Array<f32>, len: usize, stride: usize) {
    let u = UNIT_POS as usize;
    let cube = CUBE_POS as usize;
    let mut acc = 0.0f32;
    let mut i = cube * REDUCE_UNITS as usize + u;
    while i < len {
        let x = f32::cast_from(input[i]);
        acc += x * x;
        i += stride;
    }
    let mut shared = SharedMemory::<f32>::new(REDUCE_UNITS as usize);
    let total = cube_reduce(&mut shared, acc, false);
    if u == 0 {
        partials[cube] = total;
    }
}
