//! The MoE ops from standard Burn tensor ops: the default implementations of [`MoeBackend`](super::MoeBackend)
//! and the ground truth of the kernel tests.

use burn::tensor::{Int, Tensor, backend::Backend};
use kernels_cubecl::BlockSparseTopology;

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
    match parts.len() {
        0 => Tensor::zeros([0, m], (&x.device(), x.dtype())),
        // One non-empty segment (a dense layer, `moe_linear`): no concatenation copy.
        1 => parts.pop().expect("one part"),
        _ => Tensor::cat(parts, 0),
    }
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
    if parts.len() == 1 {
        // One expert (a dense layer's weight gradient): no concatenation copy.
        return parts.into_iter().next().expect("one part");
    }
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

/// The routing weights' gradient of [`reference_combine`]: `dweights[t, j] = dout[t] · y[slots[t·k + j]]`.
///
/// # Shapes
/// - `dout`: `[T, D]`, `y`: `[N, D]`, `slots`: `[T·k]`, `weights_shape`: `[T, k]` → `[T, k]`
pub(crate) fn combine_weights_grad<B: Backend>(dout: Tensor<B, 2>, y: Tensor<B, 2>, slots: Tensor<B, 1, Int>, [t, k]: [usize; 2]) -> Tensor<B, 2> {
    let [_, d] = y.dims();
    let picked = y.select(0, slots).reshape([t, k, d]);
    (picked * dout.reshape([t, 1, d])).sum_dim(2).reshape([t, k])
}

/// What [`reference_combine`]'s `y` gradient scatters into the rows `slots` name: row `t·k + j` is
/// `weights[t, j] · dout[t]`.
///
/// # Shapes
/// - `dout`: `[T, D]`, `weights`: `[T, k]` → `[T·k, D]`
pub(crate) fn combine_rows_grad<B: Backend>(dout: Tensor<B, 2>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
    let [t, k] = weights.dims();
    let [_, d] = dout.dims();
    (dout.reshape([t, 1, d]) * weights.reshape([t, k, 1])).reshape([t * k, d])
}

/// The gradients of [`reference_combine`] when `slots` is a permutation of the rows of `y`:
/// `dy[slots[i]] = weights[i / k, i % k] · dout[i / k]`, `dweights[t, j] = dout[t] · y[slots[t·k + j]]`.
///
/// # Shapes
/// - `dout`: `[T, D]`, `y`: `[N = T·k, D]`, `slots`: `[N]`, `weights`: `[T, k]` → (`[N, D]`, `[T, k]`)
pub fn reference_combine_backward<B: Backend>(
    dout: Tensor<B, 2>,
    y: Tensor<B, 2>,
    slots: Tensor<B, 1, Int>,
    weights: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [n, d] = y.dims();
    let dweights = combine_weights_grad(dout.clone(), y, slots.clone(), weights.dims());
    let contrib = combine_rows_grad(dout, weights);
    // A permutation: scattering the rows is assigning them.
    let dy = Tensor::zeros([n, d], (&contrib.device(), contrib.dtype())).select_assign(0, slots, contrib, burn::tensor::IndexingUpdateOp::Add);
    (dy, dweights)
}

/// The router's logits `x · gateᵀ` from Burn's matmul.
///
/// # Shapes
/// - `x`: `[T, D]`, `gate`: `[E, D]` → `[T, E]`
pub fn reference_gate_logits<B: Backend>(x: Tensor<B, 2>, gate: Tensor<B, 2>) -> Tensor<B, 2> {
    x.matmul(gate.transpose())
}

/// The gate's gradient `dlogitsᵀ · x` from Burn's matmul.
///
/// # Shapes
/// - `dlogits`: `[T, E]`, `x`: `[T, D]` → `[E, D]`
pub fn reference_gate_weight_grad<B: Backend>(dlogits: Tensor<B, 2>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    dlogits.transpose().matmul(x)
}

/// Dense rows `[rb·bs, cb·bs]` → their blocks `[rb·cb, bs, bs]` in block-CSR order.
fn rows_to_blocks<B: Backend>(dense: Tensor<B, 2>, bs: usize) -> Tensor<B, 3> {
    let [r, c] = dense.dims();
    let (rb, cb) = (r / bs, c / bs);
    dense.reshape([rb, bs, cb, bs]).swap_dims(1, 2).reshape([rb * cb, bs, bs])
}

/// Blocks `[rb·cb, bs, bs]` of full block rows (`cb` blocks each) → dense rows `[rb·bs, cb·bs]`.
fn blocks_to_rows<B: Backend>(blocks: Tensor<B, 3>, cb: usize) -> Tensor<B, 2> {
    let [n, bs, _] = blocks.dims();
    let rb = n / cb;
    blocks.reshape([rb, cb, bs, bs]).swap_dims(1, 2).reshape([rb * bs, cb * bs])
}

/// Expert `e`'s weight as `[F, O]` from `w: [E, F, O]` (`ffn_major`) or `[E, O, F]`.
fn expert_weight<B: Backend>(w: &Tensor<B, 3>, e: usize, ffn_major: bool) -> Tensor<B, 2> {
    let [_, a, b] = w.dims();
    let we = w.clone().slice([e..e + 1]).reshape([a, b]);
    if ffn_major { we } else { we.transpose() }
}

fn check_topology(what: &str, topology: &BlockSparseTopology, rows: usize, w: [usize; 3], ffn_axis: usize) {
    assert_eq!(rows, topology.rows(), "{what}: {rows} rows but the topology has {}", topology.rows());
    assert_eq!(w[0], topology.num_experts(), "{what}: weights for {} experts, topology for {}", w[0], topology.num_experts());
    assert_eq!(w[ffn_axis], topology.ffn(), "{what}: weight hidden width {} but topology F = {}", w[ffn_axis], topology.ffn());
}

/// Block-sparse SDD from one dense matmul per expert (its padded rows times its weight), reshaped
/// into blocks; padded hidden units are zero columns.
///
/// # Shapes
/// - `x`: `[Tp, K]`; `w`: `[E, F, K]` (`transpose`) or `[E, K, F]` → `[nnz, bs, bs]`
pub fn reference_sdd<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 3>, topology: &BlockSparseTopology, transpose: bool) -> Tensor<B, 3> {
    let [rows, _] = x.dims();
    check_topology("sdd", topology, rows, w.dims(), if transpose { 1 } else { 2 });
    let (bs, f, fp) = (topology.block(), topology.ffn(), topology.ffn_padded());
    let device = x.device();
    let mut parts = Vec::with_capacity(topology.num_experts());
    for e in 0..topology.num_experts() {
        let r = topology.expert_rows(e);
        if r.is_empty() {
            continue;
        }
        let n = r.len();
        let mut h = x.clone().slice([r]).matmul(expert_weight(&w, e, transpose).transpose());
        if fp > f {
            h = Tensor::cat(vec![h, Tensor::zeros([n, fp - f], (&device, x.dtype()))], 1);
        }
        parts.push(rows_to_blocks(h, bs));
    }
    if parts.is_empty() {
        return Tensor::zeros([0, bs, bs], (&device, x.dtype()));
    }
    Tensor::cat(parts, 0)
}

/// Block-sparse DSD from one dense matmul per expert (its blocks as dense rows, real hidden units
/// only, times its weight).
///
/// # Shapes
/// - `s`: `[nnz, bs, bs]`; `w`: `[E, M, F]` (`transpose`) or `[E, F, M]` → `[Tp, M]`
pub fn reference_dsd<B: Backend>(s: Tensor<B, 3>, w: Tensor<B, 3>, topology: &BlockSparseTopology, transpose: bool) -> Tensor<B, 2> {
    let wd = w.dims();
    check_topology("dsd", topology, topology.rows(), wd, if transpose { 2 } else { 1 });
    let m = if transpose { wd[1] } else { wd[2] };
    let f = topology.ffn();
    let device = s.device();
    let mut parts = Vec::with_capacity(topology.num_experts());
    for e in 0..topology.num_experts() {
        let blocks = topology.expert_blocks(e);
        if blocks.is_empty() {
            continue;
        }
        let dense = blocks_to_rows(s.clone().slice([blocks]), topology.blocks_per_row());
        let n = dense.dims()[0];
        parts.push(dense.slice([0..n, 0..f]).matmul(expert_weight(&w, e, !transpose)));
    }
    if parts.is_empty() {
        return Tensor::zeros([0, m], (&device, s.dtype()));
    }
    Tensor::cat(parts, 0)
}

/// Block-sparse DSᵀD from one dense matmul per expert: `s_eᵀ · d_e` over its real hidden units.
///
/// # Shapes
/// - `s`: `[nnz, bs, bs]`, `d`: `[Tp, M]` → `[E, F, M]` (or `[E, M, F]` when `transpose_out`)
pub fn reference_dstd<B: Backend>(s: Tensor<B, 3>, d: Tensor<B, 2>, topology: &BlockSparseTopology, transpose_out: bool) -> Tensor<B, 3> {
    let [rows, m] = d.dims();
    assert_eq!(rows, topology.rows(), "dstd: {rows} rows but the topology has {}", topology.rows());
    let f = topology.ffn();
    let device = d.device();
    let parts: Vec<Tensor<B, 3>> = (0..topology.num_experts())
        .map(|e| {
            let blocks = topology.expert_blocks(e);
            if blocks.is_empty() {
                return Tensor::zeros([1, f, m], (&device, d.dtype()));
            }
            let dense = blocks_to_rows(s.clone().slice([blocks]), topology.blocks_per_row());
            let n = dense.dims()[0];
            let de = d.clone().slice([topology.expert_rows(e)]);
            dense.slice([0..n, 0..f]).transpose().matmul(de).reshape([1, f, m])
        })
        .collect();
    let out = Tensor::cat(parts, 0);
    if transpose_out { out.swap_dims(1, 2) } else { out }
}
