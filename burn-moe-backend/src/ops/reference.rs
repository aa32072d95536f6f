//! The MoE ops from standard Burn tensor ops: the default implementations of [`MoeBackend`](super::MoeBackend)
//! and the ground truth of the kernel tests.

use burn::tensor::{Int, Tensor, backend::Backend};

/// Segment-wise `x[seg e] · w[e]ᵀ` (`transpose`) or `x[seg e] · w[e]`.
///
/// # Shapes
/// - `x`: `[N, K]`; `w`: `[E, M, K]` or `[E, K, M]` → `[N, M]`
pub fn reference_grouped_matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 3>, offsets: &[usize], transpose: bool) -> Tensor<B, 2> {
    let [n, k] = x.dims();
    let [e, a, b] = w.dims();
    let m = if transpose { a } else { b };
    assert_eq!(offsets.len(), e + 1, "offsets must have E + 1 = {} entries", e + 1);
    assert_eq!(offsets[e], n, "offsets end at {} but x has {n} rows", offsets[e]);
    assert_eq!(if transpose { b } else { a }, k, "inner dimensions differ");
    let mut parts = Vec::with_capacity(e);
    for expert in 0..e {
        let (start, end) = (offsets[expert], offsets[expert + 1]);
        if start == end {
            continue;
        }
        let we = w.clone().slice([expert..expert + 1]).reshape([a, b]);
        let we = if transpose { we.transpose() } else { we };
        parts.push(x.clone().slice([start..end]).matmul(we));
    }
    if parts.is_empty() {
        return Tensor::zeros([0, m], &x.device());
    }
    Tensor::cat(parts, 0)
}

/// `dw[e] = dy[seg e]ᵀ · x[seg e]` (zeros for empty segments).
///
/// # Shapes
/// - `dy`: `[N, M]`, `x`: `[N, K]` → `[E, M, K]`
pub fn reference_grouped_matmul_weight_grad<B: Backend>(dy: Tensor<B, 2>, x: Tensor<B, 2>, offsets: &[usize]) -> Tensor<B, 3> {
    let [_, m] = dy.dims();
    let [_, k] = x.dims();
    let device = x.device();
    let parts: Vec<Tensor<B, 3>> = offsets
        .windows(2)
        .map(|seg| {
            if seg[0] == seg[1] {
                Tensor::zeros([1, m, k], (&device, dy.dtype()))
            } else {
                let r = seg[0]..seg[1];
                dy.clone().slice([r.clone()]).transpose().matmul(x.clone().slice([r])).reshape([1, m, k])
            }
        })
        .collect();
    Tensor::cat(parts, 0)
}

/// `out[t] = Σ_j weights[t, j] · y[slots[t·k + j]]`.
///
/// # Shapes
/// - `y`: `[N, D]`, `slots`: `[T·k]`, `weights`: `[T, k]` → `[T, D]`
pub fn reference_combine<B: Backend>(y: Tensor<B, 2>, slots: Tensor<B, 1, Int>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
    let [t, k] = weights.dims();
    let [_, d] = y.dims();
    let picked = y.select(0, slots).reshape([t, k, d]);
    (picked * weights.reshape([t, k, 1])).sum_dim(1).reshape([t, d])
}
