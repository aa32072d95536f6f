//! The fused AdamW kernel (one thread per element) and the sum of squares of the gradient norm (one
//! pass, partial sums per cube); math in f32 whatever the storage.

use cubecl::prelude::*;

use crate::reduce::{REDUCE_UNITS, cube_reduce};

/// One AdamW step of every element, burn-optim's formula in its order of operations:
/// `m' = m·β₁ + g·(1−β₁)`, `v' = v·β₂ + g²·(1−β₂)`,
/// `p' = p·keep − lr · (m'/c₁) / (√(v'/c₂) + ε)` with `keep = 1 − lr·λ`, `cᵢ = 1 − βᵢᵗ`.
/// `g` is the stored gradient (of its own type `G`: a bf16 gradient of f32 master weights is widened
/// here, in registers, instead of by a separate pass) times `hp[9]` (the gradient-clipping factor, 1
/// without clipping). With `with_copy`, `p'` rounded to `C` also goes to `copy_out` — the next step's
/// compute copy of the weight, written by this pass instead of a separate cast that re-reads `p'`.
/// `hp` holds `[β₁, 1−β₁, β₂, 1−β₂, c₁, c₂, ε, lr, keep, grad scale]` (see `AdamWHyper`). One unit per
/// vector of `N` elements; `vectors` of them.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn adamw_kernel<F: Float, G: Float, C: Float, N: Size>(
    param: &Array<Vector<F, N>>,
    grad: &Array<Vector<G, N>>,
    m: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    hp: &Array<f32>,
    param_out: &mut Array<Vector<F, N>>,
    m_out: &mut Array<Vector<F, N>>,
    v_out: &mut Array<Vector<F, N>>,
    copy_out: &mut Array<Vector<C, N>>,
    vectors: usize,
    #[comptime] with_copy: bool,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= vectors {
        terminate!();
    }
    let b1 = Vector::<f32, N>::new(hp[0]);
    let f1 = Vector::<f32, N>::new(hp[1]);
    let b2 = Vector::<f32, N>::new(hp[2]);
    let f2 = Vector::<f32, N>::new(hp[3]);
    let c1 = Vector::<f32, N>::new(hp[4]);
    let c2 = Vector::<f32, N>::new(hp[5]);
    let eps = Vector::<f32, N>::new(hp[6]);
    let lr = Vector::<f32, N>::new(hp[7]);
    let keep = Vector::<f32, N>::new(hp[8]);
    let scale = Vector::<f32, N>::new(hp[9]);
    let g = Vector::<f32, N>::cast_from(grad[pos]) * scale;
    let m1 = Vector::<f32, N>::cast_from(m[pos]) * b1 + g * f1;
    let v1 = Vector::<f32, N>::cast_from(v[pos]) * b2 + g * g * f2;
    let delta = (m1 / c1) / (Vector::sqrt(v1 / c2) + eps);
    let p = Vector::<F, N>::cast_from(Vector::<f32, N>::cast_from(param[pos]) * keep - delta * lr);
    param_out[pos] = p;
    m_out[pos] = Vector::<F, N>::cast_from(m1);
    v_out[pos] = Vector::<F, N>::cast_from(v1);
    if with_copy {
        // Rounded from the stored `p'`, so the copy is exactly what casting the new parameter gives.
        copy_out[pos] = Vector::<C, N>::cast_from(p);
    }
}

/// Partial sums of squares (in f32) of `input`'s `vectors` vectors of `N` elements: cube `c` of the
/// grid's `cubes` (of [`REDUCE_UNITS`] units each) adds `x²` over the vectors
/// `c·REDUCE_UNITS + u + j·stride` (`stride = cubes · REDUCE_UNITS`) and writes its sum to
/// `partials[c]`. One pass over the input, nothing else written: the gradient norm's `Σ g²` without
/// the squared tensor. Vectors of 16 bytes: a bf16 gradient read element by element ran at about
/// half the memory's rate.
#[cube(launch_unchecked)]
pub fn sum_squares_kernel<F: Float, N: Size>(input: &Array<Vector<F, N>>, partials: &mut Array<f32>, vectors: usize, stride: usize) {
    let u = UNIT_POS as usize;
    let cube = CUBE_POS as usize;
    let mut acc = Vector::<f32, N>::new(0.0);
    let mut i = cube * REDUCE_UNITS as usize + u;
    while i < vectors {
        let x = Vector::<f32, N>::cast_from(input[i]);
        acc += x * x;
        i += stride;
    }
    let mut sum = 0.0f32;
    #[unroll]
    for j in 0..N::value() {
        sum += acc[j];
    }
    let mut shared = SharedMemory::<f32>::new(REDUCE_UNITS as usize);
    let total = cube_reduce(&mut shared, sum, false);
    if u == 0 {
        partials[cube] = total;
    }
}
