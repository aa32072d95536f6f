//! The `#[cube]` kernels. One unit computes one output element and accumulates in f32 whatever the
//! storage type, so f16/bf16 inputs keep f32 accuracy in the sums. Index arrays take the backend's
//! integer type `I` (i32, i64 or u32) so Burn tensors are used as they are. These are the portable, correct
//! baseline; the grouped matmul also has tiled and tensor-core kernels (`gemm.rs`).

use cubecl::prelude::*;

use crate::reduce::{REDUCE_UNITS, cube_reduce};

/// `out[i, c] = x[rows[i], c]`, in vectors of `N` elements (`vectors` per row): a row copy is a
/// memory-bound gather, and 16-byte accesses move 8 bf16 values per load where 2-byte ones moved 1.
#[cube(launch_unchecked)]
pub fn permute_kernel<F: Float, I: Int, N: Size>(x: &Array<Vector<F, N>>, rows: &Array<I>, out: &mut Array<Vector<F, N>>, vectors: usize) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= out.len() {
        terminate!();
    }
    let i = pos / vectors;
    let c = pos % vectors;
    out[pos] = x[usize::cast_from(rows[i]) * vectors + c];
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

/// `out[t, c] = Σ_j weights[t, j] · y[slots[t·k + j], c]`, in vectors of `N` elements (`vectors`
/// per row), summed in f32.
#[cube(launch_unchecked)]
pub fn combine_kernel<F: Float, I: Int, N: Size>(
    y: &Array<Vector<F, N>>,
    slots: &Array<I>,
    weights: &Array<F>,
    out: &mut Array<Vector<F, N>>,
    vectors: usize,
    top_k: usize,
) {
    let pos = ABSOLUTE_POS as usize;
    if pos >= out.len() {
        terminate!();
    }
    let t = pos / vectors;
    let c = pos % vectors;
    let mut acc = Vector::<f32, N>::new(0.0);
    for j in 0..top_k {
        let slot = usize::cast_from(slots[t * top_k + j]);
        acc += Vector::<f32, N>::new(f32::cast_from(weights[t * top_k + j])) * Vector::<f32, N>::cast_from(y[slot * vectors + c]);
    }
    out[pos] = Vector::<F, N>::cast_from(acc);
}

/// Both gradients of [`combine_kernel`] for the output gradient `dout` when `slots` names each row
/// of `y` once, one cube per token `t = CUBE_POS`: for each of its `top_k` rows `s = slots[t·k + j]`,
/// `dy[s] = weights[t, j] · dout[t]` and `dweights[t, j] = Σ_c dout[t, c] · y[s, c]` (summed in f32
/// over the cube). `dout[t]` and each `y[s]` are read once, in vectors of `N`; `vectors` = columns / N.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn combine_backward_kernel<F: Float, I: Int, N: Size>(
    dout: &Array<Vector<F, N>>,
    y: &Array<Vector<F, N>>,
    slots: &Array<I>,
    weights: &Array<F>,
    dy: &mut Array<Vector<F, N>>,
    dweights: &mut Array<F>,
    tokens: usize,
    vectors: usize,
    top_k: usize,
) {
    let t = CUBE_POS as usize;
    if t >= tokens {
        terminate!();
    }
    let nv = N::value();
    let u = UNIT_POS as usize;
    let step = REDUCE_UNITS as usize;
    let mut shared = SharedMemory::<f32>::new(REDUCE_UNITS as usize);
    for j in 0..top_k {
        let slot = usize::cast_from(slots[t * top_k + j]);
        let w = Vector::<f32, N>::new(f32::cast_from(weights[t * top_k + j]));
        let mut acc = Vector::<f32, N>::new(0.0);
        let mut c = u;
        while c < vectors {
            let g = Vector::<f32, N>::cast_from(dout[t * vectors + c]);
            acc += g * Vector::<f32, N>::cast_from(y[slot * vectors + c]);
            dy[slot * vectors + c] = Vector::<F, N>::cast_from(g * w);
            c += step;
        }
        let mut sum = 0.0f32;
        #[unroll]
        for i in 0..nv {
            sum += acc[i];
        }
        let total = cube_reduce(&mut shared, sum, false);
        if u == 0 {
            dweights[t * top_k + j] = F::cast_from(total);
        }
    }
}
