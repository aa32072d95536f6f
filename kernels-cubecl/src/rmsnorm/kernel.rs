//! The `#[cube]` kernels of the fused RMSNorm: one cube per row for the forward pass and the input
//! gradient (a cube-wide sum, then a second sweep of the row, which is still in L1/L2), one unit per
//! column and row chunk for the weight gradient's partial sums. Math in f32 whatever the storage.

use cubecl::prelude::*;

use crate::reduce::{REDUCE_UNITS, cube_reduce};

/// Row `CUBE_POS` of `x` (`dim` values): `rstd = 1 / sqrt(Σx²·inv_dim + eps)`,
/// `y = F(F(x · rstd) · w)` (the normalised row rounded to `F` before the scale, as the reference
/// model does), and `rstd` kept for the backward pass.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_kernel<F: Float>(
    x: &Array<F>,
    weight: &Array<F>,
    y: &mut Array<F>,
    rstd: &mut Array<f32>,
    rows: usize,
    dim: usize,
    inv_dim: f32,
    eps: f32,
) {
    let row = CUBE_POS as usize;
    if row >= rows {
        terminate!();
    }
    let base = row * dim;
    let u = UNIT_POS as usize;
    let step = REDUCE_UNITS as usize;
    let mut shared = SharedMemory::<f32>::new(REDUCE_UNITS as usize);
    let mut acc = 0.0f32;
    let mut c = u;
    while c < dim {
        let v = f32::cast_from(x[base + c]);
        acc += v * v;
        c += step;
    }
    let total = cube_reduce(&mut shared, acc, false);
    let r = 1.0f32 / f32::sqrt(total * inv_dim + eps);
    let mut c = u;
    while c < dim {
        let n = F::cast_from(f32::cast_from(x[base + c]) * r);
        y[base + c] = F::cast_from(f32::cast_from(n) * f32::cast_from(weight[c]));
        c += step;
    }
    if u == 0 {
        rstd[row] = r;
    }
}

/// The input gradient of [`rms_norm_kernel`] for the output gradient `dy`, row `CUBE_POS`: with
/// `n = x · rstd` and `dn = dy · w`, `dx = rstd · (dn − n · mean(dn · n))` (the rounding of `n` to
/// the storage type passes the gradient through unchanged, as a cast does).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward_kernel<F: Float>(
    x: &Array<F>,
    weight: &Array<F>,
    rstd: &Array<f32>,
    dy: &Array<F>,
    dx: &mut Array<F>,
    rows: usize,
    dim: usize,
    inv_dim: f32,
) {
    let row = CUBE_POS as usize;
    if row >= rows {
        terminate!();
    }
    let base = row * dim;
    let u = UNIT_POS as usize;
    let step = REDUCE_UNITS as usize;
    let r = rstd[row];
    let mut shared = SharedMemory::<f32>::new(REDUCE_UNITS as usize);
    // Σ dn·x, times r below: Σ dn·n without a multiplication per element.
    let mut acc = 0.0f32;
    let mut c = u;
    while c < dim {
        acc += f32::cast_from(dy[base + c]) * f32::cast_from(weight[c]) * f32::cast_from(x[base + c]);
        c += step;
    }
    let mean = cube_reduce(&mut shared, acc, false) * r * inv_dim;
    let mut c = u;
    while c < dim {
        let n = f32::cast_from(x[base + c]) * r;
        let dn = f32::cast_from(dy[base + c]) * f32::cast_from(weight[c]);
        dx[base + c] = F::cast_from(r * (dn - n * mean));
        c += step;
    }
}

/// Partial sums of the weight gradient `dw[c] = Σ_rows dy · F(x · rstd)` (the rounded normalised
/// row, which is what the scale multiplied): unit `c = CUBE_POS_X · CUBE_DIM_X + UNIT_POS_X` sums
/// rows `CUBE_POS_Y · chunk ..` (at most `chunk` of them) into `partials[CUBE_POS_Y · dim + c]`.
/// A warp reads consecutive columns of one row at a time, so the loads coalesce.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_weight_grad_kernel<F: Float>(
    x: &Array<F>,
    rstd: &Array<f32>,
    dy: &Array<F>,
    partials: &mut Array<f32>,
    rows: usize,
    dim: usize,
    chunk: usize,
) {
    let c = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if c >= dim {
        terminate!();
    }
    let first = CUBE_POS_Y as usize * chunk;
    let last = min(rows, first + chunk);
    let mut acc = 0.0f32;
    let mut r = first;
    while r < last {
        let n = F::cast_from(f32::cast_from(x[r * dim + c]) * rstd[r]);
        acc += f32::cast_from(dy[r * dim + c]) * f32::cast_from(n);
        r += 1;
    }
    partials[CUBE_POS_Y as usize * dim + c] = acc;
}

/// `dw[c] = Σ_k partials[k · dim + c]` over the `chunks` partial rows, rounded to the storage type.
#[cube(launch_unchecked)]
pub fn rms_norm_weight_grad_finish_kernel<F: Float>(partials: &Array<f32>, dw: &mut Array<F>, dim: usize, chunks: usize) {
    let c = ABSOLUTE_POS as usize;
    if c >= dim {
        terminate!();
    }
    let mut acc = 0.0f32;
    let mut k = 0usize;
    while k < chunks {
        acc += partials[k * dim + c];
        k += 1;
    }
    dw[c] = F::cast_from(acc);
}
