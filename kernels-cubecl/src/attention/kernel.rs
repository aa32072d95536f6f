//! The `#[cube]` kernels of the causal-attention softmax: one cube per score row for the forward pass
//! (three sweeps of the row: maximum, sum of exponentials, probabilities), one unit per score for the
//! backward pass. Math in f32 whatever the storage.

use cubecl::prelude::*;

use crate::reduce::{REDUCE_UNITS, cube_reduce};

/// Units per cube of [`attention_softmax_kernel`] (the cube-wide reductions' size).
pub const SOFTMAX_UNITS: u32 = REDUCE_UNITS;

/// The columns `[lo, hi)` of a row's keys that its query sees: keys `first_key + col` with
/// `query − window < key ≤ query` (`window == 0`: no window).
#[cube]
fn visible_columns(query: usize, keys: usize, first_key: usize, window: usize) -> (usize, usize) {
    // `first_key ≤ query` for every row of a block (a block's keys start at or before its first query).
    let hi = min(keys, query + 1 - first_key);
    let mut lo = 0usize;
    if window > 0 && query + 1 > first_key + window {
        lo = query + 1 - window - first_key;
    }
    (lo, hi)
}

/// Row `r` of `scores` (`keys` values, contiguous rows) belongs to query `first_query + r % queries`;
/// writes the probabilities `softmax(scale · scores)` over the keys that query sees (zero elsewhere)
/// to `probs`, and `lse[r] = log Σ exp(scale · score)` over the same keys. One cube per row, cubes
/// numbered linearly over the grid.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attention_softmax_kernel<F: Float>(
    scores: &Array<F>,
    probs: &mut Array<F>,
    lse: &mut Array<f32>,
    rows: usize,
    keys: usize,
    queries: usize,
    first_query: usize,
    first_key: usize,
    scale: f32,
    window: usize,
) {
    let row = CUBE_POS as usize;
    if row >= rows {
        terminate!();
    }
    let (lo, hi) = visible_columns(first_query + row % queries, keys, first_key, window);
    let base = row * keys;
    let u = UNIT_POS as usize;
    let step = SOFTMAX_UNITS as usize;
    let mut shared = SharedMemory::<f32>::new(SOFTMAX_UNITS as usize);

    // Every row sees at least one key (`lo < hi`): its first score is a valid start for every unit.
    let mut local_max = f32::cast_from(scores[base + lo]) * scale;
    let mut c = lo + u;
    while c < hi {
        local_max = max(local_max, f32::cast_from(scores[base + c]) * scale);
        c += step;
    }
    let row_max = cube_reduce(&mut shared, local_max, true);

    let mut local_sum = 0.0f32;
    let mut c = lo + u;
    while c < hi {
        local_sum += f32::exp(f32::cast_from(scores[base + c]) * scale - row_max);
        c += step;
    }
    let row_sum = cube_reduce(&mut shared, local_sum, false);

    let mut c = u;
    while c < keys {
        let mut p = 0.0f32;
        if c >= lo && c < hi {
            p = f32::exp(f32::cast_from(scores[base + c]) * scale - row_max) / row_sum;
        }
        probs[base + c] = F::cast_from(p);
        c += step;
    }
    if u == 0 {
        lse[row] = row_max + f32::ln(row_sum);
    }
}

/// The backward pass of [`attention_softmax_kernel`] for the probability gradients `dprobs`, one
/// unit per score: `p = exp(scale · score − lse[r])` where the query sees the key (zero elsewhere),
/// written to `probs`, and `dscores = scale · p · (dprobs − correction[r])`, where `correction[r]` is
/// `Σ_c p·dprobs` of the row (computed by the caller as `rowsum(dO ⊙ O)`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attention_softmax_backward_kernel<F: Float>(
    scores: &Array<F>,
    dprobs: &Array<F>,
    lse: &Array<f32>,
    correction: &Array<f32>,
    probs: &mut Array<F>,
    dscores: &mut Array<F>,
    keys: usize,
    queries: usize,
    first_query: usize,
    first_key: usize,
    scale: f32,
    window: usize,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= probs.len() {
        terminate!();
    }
    let row = pos / keys;
    let c = pos % keys;
    let (lo, hi) = visible_columns(first_query + row % queries, keys, first_key, window);
    let mut p = 0.0f32;
    let mut ds = 0.0f32;
    if c >= lo && c < hi {
        p = f32::exp(f32::cast_from(scores[pos]) * scale - lse[row]);
        ds = scale * p * (f32::cast_from(dprobs[pos]) - correction[row]);
    }
    probs[pos] = F::cast_from(p);
    dscores[pos] = F::cast_from(ds);
}
