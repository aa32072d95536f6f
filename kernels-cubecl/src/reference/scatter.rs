//! Plain-Rust references of the scatter kernels (f64 accumulation), row-major buffers.

/// `out[i] = x[rows[i]]`.
pub fn permute(x: &[f32], rows: &[u32], cols: usize) -> Vec<f32> {
    rows.iter().flat_map(|&r| x[r as usize * cols..(r as usize + 1) * cols].iter().copied()).collect()
}

/// Segment-wise `x · w[e]ᵀ` (`transpose`, `w: [E, m, k]`) or `x · w[e]` (`w: [E, k, m]`).
pub fn grouped_matmul(x: &[f32], w: &[f32], offsets: &[usize], m: usize, k: usize, transpose: bool) -> Vec<f32> {
    let rows = offsets[offsets.len() - 1];
    let mut out = vec![0f32; rows * m];
    for (e, seg) in offsets.windows(2).enumerate() {
        for i in seg[0]..seg[1] {
            for j in 0..m {
                let mut acc = 0f64;
                for l in 0..k {
                    let wv = if transpose { w[(e * m + j) * k + l] } else { w[(e * k + l) * m + j] };
                    acc += x[i * k + l] as f64 * wv as f64;
                }
                out[i * m + j] = acc as f32;
            }
        }
    }
    out
}

/// `dw[e] = dy[seg e]ᵀ · x[seg e]`, `[E, m, k]`.
pub fn grouped_matmul_weight_grad(dy: &[f32], x: &[f32], offsets: &[usize], m: usize, k: usize) -> Vec<f32> {
    let experts = offsets.len() - 1;
    let mut dw = vec![0f32; experts * m * k];
    for (e, seg) in offsets.windows(2).enumerate() {
        for j in 0..m {
            for l in 0..k {
                let acc: f64 = (seg[0]..seg[1]).map(|i| dy[i * m + j] as f64 * x[i * k + l] as f64).sum();
                dw[(e * m + j) * k + l] = acc as f32;
            }
        }
    }
    dw
}

/// `out[t] = Σ_j weights[t, j] · y[slots[t·k + j]]`.
pub fn combine(y: &[f32], slots: &[u32], weights: &[f32], top_k: usize, cols: usize) -> Vec<f32> {
    let tokens = weights.len() / top_k;
    let mut out = vec![0f32; tokens * cols];
    for t in 0..tokens {
        for c in 0..cols {
            let acc: f64 = (0..top_k)
                .map(|j| weights[t * top_k + j] as f64 * y[slots[t * top_k + j] as usize * cols + c] as f64)
                .sum();
            out[t * cols + c] = acc as f32;
        }
    }
    out
}

/// The gradients of [`combine`] for the output gradient `dout` when `slots` names each row of `y`
/// once: `dy[slots[t·k + j]] = weights[t, j] · dout[t]`, `dweights[t, j] = dout[t] · y[slots[t·k + j]]`.
pub fn combine_backward(dout: &[f32], y: &[f32], slots: &[u32], weights: &[f32], top_k: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let tokens = weights.len() / top_k;
    let mut dy = vec![0f32; y.len()];
    let mut dweights = vec![0f32; tokens * top_k];
    for t in 0..tokens {
        for j in 0..top_k {
            let (s, w) = (slots[t * top_k + j] as usize, weights[t * top_k + j] as f64);
            let mut acc = 0f64;
            for c in 0..cols {
                let g = dout[t * cols + c] as f64;
                acc += g * y[s * cols + c] as f64;
                dy[s * cols + c] = (w * g) as f32;
            }
            dweights[t * top_k + j] = acc as f32;
        }
    }
    (dy, dweights)
}
