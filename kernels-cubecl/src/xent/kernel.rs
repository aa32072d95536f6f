//! The `#[cube]` kernels of the fused cross-entropy: one cube per row forward (maximum, then the sum
//! of exponentials), one unit per logit backward. Math in f32 whatever the storage.

use cubecl::prelude::*;

use crate::reduce::{REDUCE_UNITS, cube_reduce};

/// Row `CUBE_POS` of `logits` (`vocab` values): `lse[r] = log Σ exp(logit)`, and
/// `nll[r] = lse[r] − logit[target[r]]`, or 0 when the target is outside `0..vocab` (ignored).
#[cube(launch_unchecked)]
pub fn cross_entropy_kernel<F: Float, I: Int>(
    logits: &Array<F>,
    targets: &Array<I>,
    nll: &mut Array<f32>,
    lse: &mut Array<f32>,
    rows: usize,
    vocab: usize,
) {
    let row = CUBE_POS as usize;
    if row >= rows {
        terminate!();
    }
    let base = row * vocab;
    let u = UNIT_POS as usize;
    let step = REDUCE_UNITS as usize;
    let mut shared = SharedMemory::<f32>::new(REDUCE_UNITS as usize);
    // Every row has a first logit (`vocab > 0`): a valid start for every unit's maximum.
    let mut local_max = f32::cast_from(logits[base]);
    let mut c = u;
    while c < vocab {
        local_max = max(local_max, f32::cast_from(logits[base + c]));
        c += step;
    }
    let row_max = cube_reduce(&mut shared, local_max, true);
    let mut local_sum = 0.0f32;
    let mut c = u;
    while c < vocab {
        local_sum += f32::exp(f32::cast_from(logits[base + c]) - row_max);
        c += step;
    }
    let row_lse = row_max + f32::ln(cube_reduce(&mut shared, local_sum, false));
    if u == 0 {
        // Targets as i32 (vocabularies are far below 2³¹; wgpu has no 64-bit integers).
        let t = i32::cast_from(targets[row]);
        let mut loss = 0.0f32;
        if t >= 0 {
            let col = usize::cast_from(t);
            if col < vocab {
                loss = row_lse - f32::cast_from(logits[base + col]);
            }
        }
        nll[row] = loss;
        lse[row] = row_lse;
    }
}

/// The gradient of [`cross_entropy_kernel`]'s `nll` for its output gradient `dnll`, one unit per
/// logit: `dlogits = dnll[r] · (exp(logit − lse[r]) − [c = target[r]])`, zero for ignored rows.
#[cube(launch_unchecked)]
pub fn cross_entropy_backward_kernel<F: Float, I: Int>(
    logits: &Array<F>,
    targets: &Array<I>,
    lse: &Array<f32>,
    dnll: &Array<f32>,
    dlogits: &mut Array<F>,
    vocab: usize,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= dlogits.len() {
        terminate!();
    }
    let row = pos / vocab;
    let c = pos % vocab;
    let t = i32::cast_from(targets[row]);
    let mut d = 0.0f32;
    if t >= 0 {
        let col = usize::cast_from(t);
        if col < vocab {
            let p = f32::exp(f32::cast_from(logits[pos]) - lse[row]);
            let mut hit = 0.0f32;
            if c == col {
                hit = 1.0;
            }
            d = dnll[row] * (p - hit);
        }
    }
    dlogits[pos] = F::cast_from(d);
}
