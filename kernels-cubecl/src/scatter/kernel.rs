//! The `#[cube]` kernels. One unit computes one output element and accumulates in f32 whatever the
//! storage type, so f16/bf16 inputs keep f32 accuracy in the sums. Index arrays take the backend's
//! integer type `I` (i32, i64 or u32) so Burn tensors are used as they are. These are the portable, correct
//! baseline; the grouped matmul also has tiled and tensor-core kernels (`gemm.rs`).

use cubecl::prelude::*;

/// `out[i, c] = x[rows[i], c]`.
#[cube(launch)]
pub fn permute_kernel<F: Float, I: Int>(x: &Array<F>, rows: &Array<I>, out: &mut Array<F>, cols: usize) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= out.len() {
        terminate!();
    }
    let i = pos / cols;
    let c = pos % cols;
    out[pos] = x[usize::cast_from(rows[i]) * cols + c];
}

/// Per expert segment `e` (`offsets[e] ≤ i < offsets[e+1]`):
/// `out[i, j] = Σ_l x[i, l] · w[e, j, l]` (`transpose`) or `Σ_l x[i, l] · w[e, l, j]`.
#[cube(launch)]
pub fn grouped_matmul_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    offsets: &Array<u32>,
    out: &mut Array<F>,
    m: usize,
    k: usize,
    num_experts: usize,
    #[comptime] transpose: bool,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= out.len() {
        terminate!();
    }
    let i = pos / m;
    let j = pos % m;
    // Segments are few (the number of experts): a linear scan is cheaper than a binary search here.
    let mut e = 0usize;
    for s in 0..num_experts {
        if i >= offsets[s + 1] as usize {
            e = s + 1;
        }
    }
    let mut acc = f32::new(0.0);
    for l in 0..k {
        let wv = if transpose { w[(e * m + j) * k + l] } else { w[(e * k + l) * m + j] };
        acc += f32::cast_from(x[i * k + l]) * f32::cast_from(wv);
    }
    out[pos] = F::cast_from(acc);
}

/// `dw[e, j, l] = Σ_{i in segment e} dy[i, j] · x[i, l]`.
#[cube(launch)]
pub fn grouped_matmul_weight_grad_kernel<F: Float>(
    dy: &Array<F>,
    x: &Array<F>,
    offsets: &Array<u32>,
    dw: &mut Array<F>,
    m: usize,
    k: usize,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= dw.len() {
        terminate!();
    }
    let e = pos / (m * k);
    let j = (pos / k) % m;
    let l = pos % k;
    let start = offsets[e] as usize;
    let end = offsets[e + 1] as usize;
    let mut acc = f32::new(0.0);
    for i in start..end {
        acc += f32::cast_from(dy[i * m + j]) * f32::cast_from(x[i * k + l]);
    }
    dw[pos] = F::cast_from(acc);
}

/// `out[t, c] = Σ_j weights[t, j] · y[slots[t·k + j], c]`.
#[cube(launch)]
pub fn combine_kernel<F: Float, I: Int>(
    y: &Array<F>,
    slots: &Array<I>,
    weights: &Array<F>,
    out: &mut Array<F>,
    cols: usize,
    top_k: usize,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= out.len() {
        terminate!();
    }
    let t = pos / cols;
    let c = pos % cols;
    let mut acc = f32::new(0.0);
    for j in 0..top_k {
        let slot = usize::cast_from(slots[t * top_k + j]);
        acc += f32::cast_from(weights[t * top_k + j]) * f32::cast_from(y[slot * cols + c]);
    }
    out[pos] = F::cast_from(acc);
}
