//! `Autodiff<B>` for [`MoeBackend`]: each op records a backward pass made of the adjoint ops, run on
//! the inner backend (so CubeCL backends differentiate with their own kernels).
//!
//! | forward | d(input) | d(weight) |
//! | --- | --- | --- |
//! | `permute(x, rows)` | scatter-add of `dy` into `rows` (index inverted on the host) | — |
//! | `grouped_matmul(x, w, ᵀ)` | `grouped_matmul(dy, w, no ᵀ)` | `weight_grad(dy, x)` |
//! | `grouped_matmul(x, w, no ᵀ)` | `grouped_matmul(dy, w, ᵀ)` | `weight_grad(x, dy)` |
//! | `combine(y, slots, wts)` | `wts · dy` scattered to `slots` | `⟨y[slots], dy⟩` |
//! | `swiglu(gate, up)` | `swiglu_backward(gate, up, dh)` | — |
//! | `sdd(x, w, ᵀ)` | `dsd(dy, w, no ᵀ)` | `dstd(dy, x)` |
//! | `sdd(x, w, no ᵀ)` | `dsd(dy, w, ᵀ)` | `dstd(dy, x, out ᵀ)` |
//! | `dsd(s, w, ᵀ)` | `sdd(dy, w, no ᵀ)` | `dstd(s, dy, out ᵀ)` |
//! | `dsd(s, w, no ᵀ)` | `sdd(dy, w, ᵀ)` | `dstd(s, dy)` |
//! | `rms_norm(x, w)` | `rms_norm_backward(x, w, rstd, dy)` | the same call (skipped when `w` is frozen) |
//! | `cross_entropy(logits, targets)` | `cross_entropy_backward(logits, targets, lse, dnll)` | — |
//! | `attention(q, k, v)` | `attention_backward(q, k, v, out, lse, dout)` (q, k and v) | — |

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorMetadata, TensorPrimitive, backend::Backend};
use kernels_cubecl::BlockSparseTopology;

use super::backend::{HostIndex, MoeBackend};
use crate::attention::CausalAttention;
use super::reference::{combine_rows_grad, combine_weights_grad};
use super::scatter_add::{scatter_add_rows, scatter_add_rows_host};

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

impl<B: MoeBackend, C: CheckpointStrategy> MoeBackend for Autodiff<B, C> {
    fn moe_permute(x: FloatTensor<Self>, rows: IntTensor<Self>) -> FloatTensor<Self> {
        permute::<B, C>(x, rows, None)
    }

    fn moe_permute_host(x: FloatTensor<Self>, rows: IntTensor<Self>, rows_host: &HostIndex) -> FloatTensor<Self> {
        permute::<B, C>(x, rows, Some(rows_host.clone()))
    }

    fn moe_grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        offsets: &[usize],
        transpose: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GroupedMatmulBackward;

        impl<B: MoeBackend> Backward<B, 2> for GroupedMatmulBackward {
            type State = (FloatTensor<B>, FloatTensor<B>, Vec<usize>, bool);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_x, node_w] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (x, w, offsets, transpose) = ops.state;
                if let Some(node) = node_w {
                    let dw = if transpose {
                        B::moe_grouped_matmul_weight_grad(dy.clone(), x, &offsets)
                    } else {
                        B::moe_grouped_matmul_weight_grad(x, dy.clone(), &offsets)
                    };
                    grads.register::<B>(node.id, dw);
                }
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::moe_grouped_matmul(dy, w, &offsets, !transpose));
                }
            }
        }

        match GroupedMatmulBackward.prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::moe_grouped_matmul(x.primitive.clone(), w.primitive.clone(), offsets, transpose);
                prep.finish((x.primitive, w.primitive, offsets.to_vec(), transpose), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_grouped_matmul(x.primitive, w.primitive, offsets, transpose)),
        }
    }

    fn moe_grouped_matmul_weight_grad(dy: FloatTensor<Self>, x: FloatTensor<Self>, offsets: &[usize]) -> FloatTensor<Self> {
        // Used inside backward passes only; second derivatives are not needed.
        <FloatTensor<Self>>::new(B::moe_grouped_matmul_weight_grad(dy.primitive, x.primitive, offsets))
    }

    fn moe_combine(y: FloatTensor<Self>, slots: IntTensor<Self>, weights: FloatTensor<Self>) -> FloatTensor<Self> {
        combine::<B, C>(y, slots, None, weights)
    }

    fn moe_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        // A statistic (the gradient norm), not differentiated: the inner backend's op, untracked.
        <FloatTensor<Self>>::new(B::moe_sum_squares(x.primitive))
    }

    fn moe_combine_host(y: FloatTensor<Self>, slots: IntTensor<Self>, slots_host: &HostIndex, weights: FloatTensor<Self>) -> FloatTensor<Self> {
        combine::<B, C>(y, slots, Some(slots_host.clone()), weights)
    }

    fn moe_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwigluBackward;

        impl<B: MoeBackend> Backward<B, 2> for SwigluBackward {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_gate, node_up] = ops.parents;
                let dh = grads.consume::<B>(&ops.node);
                let (gate, up) = ops.state;
                let (d_gate, d_up) = B::moe_swiglu_backward(gate, up, dh);
                if let Some(node) = node_gate {
                    grads.register::<B>(node.id, d_gate);
                }
                if let Some(node) = node_up {
                    grads.register::<B>(node.id, d_up);
                }
            }
        }

        match SwigluBackward.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::moe_swiglu(gate.primitive.clone(), up.primitive.clone());
                prep.finish((gate.primitive, up.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_swiglu(gate.primitive, up.primitive)),
        }
    }

    fn moe_swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, dh: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // Used inside backward passes only; second derivatives are not needed.
        let (d_gate, d_up) = B::moe_swiglu_backward(gate.primitive, up.primitive, dh.primitive);
        (<FloatTensor<Self>>::new(d_gate), <FloatTensor<Self>>::new(d_up))
    }

    fn moe_sdd(x: FloatTensor<Self>, w: FloatTensor<Self>, topology: &BlockSparseTopology, transpose: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SddBackward;

        impl<B: MoeBackend> Backward<B, 2> for SddBackward {
            type State = (FloatTensor<B>, FloatTensor<B>, BlockSparseTopology, bool);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_x, node_w] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (x, w, topology, transpose) = ops.state;
                if let Some(node) = node_w {
                    grads.register::<B>(node.id, B::moe_dstd(dy.clone(), x, &topology, !transpose));
                }
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::moe_dsd(dy, w, &topology, !transpose));
                }
            }
        }

        match SddBackward.prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::moe_sdd(x.primitive.clone(), w.primitive.clone(), topology, transpose);
                prep.finish((x.primitive, w.primitive, topology.clone(), transpose), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_sdd(x.primitive, w.primitive, topology, transpose)),
        }
    }

    fn moe_dsd(s: FloatTensor<Self>, w: FloatTensor<Self>, topology: &BlockSparseTopology, transpose: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DsdBackward;

        impl<B: MoeBackend> Backward<B, 2> for DsdBackward {
            type State = (FloatTensor<B>, FloatTensor<B>, BlockSparseTopology, bool);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_s, node_w] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (s, w, topology, transpose) = ops.state;
                if let Some(node) = node_w {
                    grads.register::<B>(node.id, B::moe_dstd(s, dy.clone(), &topology, transpose));
                }
                if let Some(node) = node_s {
                    // The adjoint of a DSD is an SDD on the same topology: only the nonzero blocks of
                    // `dy · Wcatᵀ` are gradients of stored values.
                    grads.register::<B>(node.id, B::moe_sdd(dy, w, &topology, !transpose));
                }
            }
        }

        match DsdBackward.prepare::<C>([s.node.clone(), w.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::moe_dsd(s.primitive.clone(), w.primitive.clone(), topology, transpose);
                prep.finish((s.primitive, w.primitive, topology.clone(), transpose), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_dsd(s.primitive, w.primitive, topology, transpose)),
        }
    }

    fn moe_dstd(s: FloatTensor<Self>, d: FloatTensor<Self>, topology: &BlockSparseTopology, transpose_out: bool) -> FloatTensor<Self> {
        // Used inside backward passes only; second derivatives are not needed.
        <FloatTensor<Self>>::new(B::moe_dstd(s.primitive, d.primitive, topology, transpose_out))
    }

    fn moe_gate_logits(x: FloatTensor<Self>, gate: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GateBackward;

        impl<B: MoeBackend> Backward<B, 2> for GateBackward {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_x, node_gate] = ops.parents;
                let dlogits = grads.consume::<B>(&ops.node);
                let (x, gate) = ops.state;
                if let Some(node) = node_x {
                    // [T, E] · [E, D]: a wide output, which Burn's matmul tiles well.
                    let dx = float::<B, 2>(dlogits.clone()).matmul(float(gate));
                    grads.register::<B>(node.id, prim(dx));
                }
                if let Some(node) = node_gate {
                    grads.register::<B>(node.id, B::moe_gate_weight_grad(dlogits, x));
                }
            }
        }

        match GateBackward.prepare::<C>([x.node.clone(), gate.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let logits = B::moe_gate_logits(x.primitive.clone(), gate.primitive.clone());
                prep.finish((x.primitive, gate.primitive), logits)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_gate_logits(x.primitive, gate.primitive)),
        }
    }

    fn moe_gate_weight_grad(dlogits: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        // Used inside backward passes only; second derivatives are not needed.
        <FloatTensor<Self>>::new(B::moe_gate_weight_grad(dlogits.primitive, x.primitive))
    }

    fn moe_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct RmsNormBackward;

        impl<B: MoeBackend> Backward<B, 2> for RmsNormBackward {
            // x, the scale and the per-row rstd: the composed norm kept an f32 copy of x and more.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_x, node_w] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (x, weight, rstd) = ops.state;
                let (dx, dw) = B::moe_rms_norm_backward(x, weight, rstd, dy, node_w.is_some());
                if let (Some(node), Some(dw)) = (node_w, dw) {
                    grads.register::<B>(node.id, dw);
                }
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, dx);
                }
            }
        }

        match RmsNormBackward.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, rstd) = B::moe_rms_norm(x.primitive.clone(), weight.primitive.clone(), eps);
                let y = prep.finish((x.primitive, weight.primitive, rstd.clone()), y);
                // rstd is bookkeeping for the backward pass, not differentiated.
                (y, <FloatTensor<Self>>::new(rstd))
            }
            OpsKind::UnTracked(prep) => {
                let (y, rstd) = B::moe_rms_norm(x.primitive, weight.primitive, eps);
                (prep.finish(y), <FloatTensor<Self>>::new(rstd))
            }
        }
    }

    fn moe_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        // Used inside backward passes only; second derivatives are not needed.
        let (dx, dw) = B::moe_rms_norm_backward(x.primitive, weight.primitive, rstd.primitive, dy.primitive, weight_grad);
        (<FloatTensor<Self>>::new(dx), dw.map(<FloatTensor<Self>>::new))
    }

    fn moe_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct CrossEntropyBackward;

        impl<B: MoeBackend> Backward<B, 1> for CrossEntropyBackward {
            // The logits, targets and per-row log-sum-exp: the composed loss kept an f32 copy of
            // the logits and their log-softmax.
            type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node] = ops.parents;
                let dnll = grads.consume::<B>(&ops.node);
                let (logits, targets, lse) = ops.state;
                if let Some(node) = node {
                    grads.register::<B>(node.id, B::moe_cross_entropy_backward(logits, targets, lse, dnll));
                }
            }
        }

        match CrossEntropyBackward.prepare::<C>([logits.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (nll, lse) = B::moe_cross_entropy(logits.primitive.clone(), targets.clone());
                let nll = prep.finish((logits.primitive, targets, lse.clone()), nll);
                // lse is bookkeeping for the backward pass, not differentiated.
                (nll, <FloatTensor<Self>>::new(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (nll, lse) = B::moe_cross_entropy(logits.primitive, targets);
                (prep.finish(nll), <FloatTensor<Self>>::new(lse))
            }
        }
    }

    fn moe_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dnll: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // Used inside backward passes only; second derivatives are not needed.
        <FloatTensor<Self>>::new(B::moe_cross_entropy_backward(logits.primitive, targets, lse.primitive, dnll.primitive))
    }

    fn moe_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: &CausalAttention,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct AttentionBackward;

        impl<B: MoeBackend> Backward<B, 3> for AttentionBackward {
            // q, k, v, output, log-sum-exp: O(S) per head, where the composed attention keeps O(S²).
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, CausalAttention);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let dout = grads.consume::<B>(&ops.node);
                let (q, k, v, out, lse, spec) = ops.state;
                let (dq, dk, dv) = B::moe_attention_backward(q, k, v, out, lse, dout, &spec);
                for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        match AttentionBackward.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::moe_attention(q.primitive.clone(), k.primitive.clone(), v.primitive.clone(), spec);
                let out = prep.finish((q.primitive, k.primitive, v.primitive, out.clone(), lse.clone(), *spec), out);
                // The log-sum-exp is bookkeeping for the backward pass, not differentiated.
                (out, <FloatTensor<Self>>::new(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::moe_attention(q.primitive, k.primitive, v.primitive, spec);
                (prep.finish(out), <FloatTensor<Self>>::new(lse))
            }
        }
    }

    fn moe_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        spec: &CausalAttention,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Used inside backward passes only; second derivatives are not needed.
        let (dq, dk, dv) =
            B::moe_attention_backward(q.primitive, k.primitive, v.primitive, out.primitive, lse.primitive, dout.primitive, spec);
        (<FloatTensor<Self>>::new(dq), <FloatTensor<Self>>::new(dk), <FloatTensor<Self>>::new(dv))
    }
}

/// The row gather `out[i] = x[rows[i]]` with its backward, a scatter-add of the output gradient into
/// `rows`, built from `rows_host` when the caller gave it (no read-back of `rows`).
fn permute<B: MoeBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    rows: IntTensor<B>,
    rows_host: Option<HostIndex>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct PermuteBackward;

    impl<B: MoeBackend> Backward<B, 1> for PermuteBackward {
        type State = (IntTensor<B>, Option<HostIndex>, usize);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x] = ops.parents;
            let dy: Tensor<B, 2> = float(grads.consume::<B>(&ops.node));
            let (rows, rows_host, num_rows) = ops.state;
            if let Some(node) = node_x {
                let dx = match rows_host {
                    Some(host) => scatter_add_rows_host(dy, host.as_slice(), num_rows),
                    None => scatter_add_rows(dy, Tensor::<B, 1, Int>::from_primitive(rows), num_rows),
                };
                grads.register::<B>(node.id, prim(dx));
            }
        }
    }

    let num_rows = x.primitive.shape()[0];
    match PermuteBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((rows.clone(), rows_host, num_rows), B::moe_permute(x.primitive, rows)),
        OpsKind::UnTracked(prep) => prep.finish(B::moe_permute(x.primitive, rows)),
    }
}

/// The weighted combine with its backward: the routing weights' gradient gathers `y` at `slots`, and
/// `y`'s gradient scatters the weighted output gradient into `slots` (from `slots_host` when given).
fn combine<B: MoeBackend, C: CheckpointStrategy>(
    y: FloatTensor<Autodiff<B, C>>,
    slots: IntTensor<B>,
    slots_host: Option<HostIndex>,
    weights: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct CombineBackward;

    impl<B: MoeBackend> Backward<B, 2> for CombineBackward {
        type State = (FloatTensor<B>, IntTensor<B>, Option<HostIndex>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_y, node_w] = ops.parents;
            let dout: Tensor<B, 2> = float(grads.consume::<B>(&ops.node));
            let (y, slots, slots_host, weights) = ops.state;
            // The MoE layers' slots name each sorted row once: then one fused pass gives both
            // gradients (a permutation checked on the host copy; none is read back).
            if slots_host.as_ref().is_some_and(|h| h.len() == y.shape()[0] && h.is_permutation()) {
                let (dy, dw) = B::moe_combine_backward(prim(dout), y, slots, weights);
                if let Some(node) = node_w {
                    grads.register::<B>(node.id, dw);
                }
                if let Some(node) = node_y {
                    grads.register::<B>(node.id, dy);
                }
                return;
            }
            let y: Tensor<B, 2> = float(y);
            let weights: Tensor<B, 2> = float(weights);
            let slots = Tensor::<B, 1, Int>::from_primitive(slots);
            let n = y.dims()[0];
            if let Some(node) = node_w {
                let dw = combine_weights_grad(dout.clone(), y, slots.clone(), weights.dims());
                grads.register::<B>(node.id, prim(dw));
            }
            if let Some(node) = node_y {
                let contrib = combine_rows_grad(dout, weights);
                let dy = match slots_host {
                    Some(host) => scatter_add_rows_host(contrib, host.as_slice(), n),
                    None => scatter_add_rows(contrib, slots, n),
                };
                grads.register::<B>(node.id, prim(dy));
            }
        }
    }

    match CombineBackward.prepare::<C>([y.node.clone(), weights.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let out = B::moe_combine(y.primitive.clone(), slots.clone(), weights.primitive.clone());
            prep.finish((y.primitive, slots, slots_host, weights.primitive), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::moe_combine(y.primitive, slots, weights.primitive)),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Int, Tensor, TensorData, Tolerance};

    use crate::ops::{HostIndex, moe_combine, moe_combine_host, moe_permute, moe_permute_host};

    type B = Autodiff<NdArray<f32>>;

    fn leaf(values: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default()).require_grad()
    }

    /// The gate op's gradients (its own backward: `dlogits · gate` and the gate-gradient op) equal
    /// those of Burn's matmul.
    #[test]
    fn gate_logits_have_the_gradients_of_a_matmul() {
        let device = Default::default();
        let xv: Vec<f32> = (0..15).map(|i| (i as f32 * 0.37).sin()).collect();
        let gv: Vec<f32> = (0..10).map(|i| (i as f32 * 0.71).cos()).collect();
        let probe = Tensor::<B, 2>::from_data(TensorData::new((0..6).map(|i| i as f32 - 2.5).collect::<Vec<_>>(), [3, 2]), &device);
        let grads = |f: &dyn Fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>| {
            let (x, gate) = (leaf(xv.clone(), [3, 5]), leaf(gv.clone(), [2, 5]));
            let g = (f(x.clone(), gate.clone()) * probe.clone()).sum().backward();
            (x.grad(&g).unwrap().into_data(), gate.grad(&g).unwrap().into_data())
        };
        let (dx, dgate) = grads(&|x, gate| crate::ops::moe_gate_logits(x, gate));
        let (dx_ref, dgate_ref) = grads(&|x, gate| x.matmul(gate.transpose()));
        dx.assert_approx_eq::<f32>(&dx_ref, Tolerance::absolute(1e-6));
        dgate.assert_approx_eq::<f32>(&dgate_ref, Tolerance::absolute(1e-6));
    }

    /// The gradients through the host-index ops equal those of Burn's `select` (whose backward is
    /// Burn's own scatter-add), for an index that reads one row twice and one row not at all.
    #[test]
    fn host_index_ops_have_the_gradients_of_select() {
        let device = Default::default();
        let xv: Vec<f32> = (0..8).map(|i| i as f32 * 0.25 - 1.0).collect();
        let rows = vec![2i64, 0, 2, 1, 0];
        let host = HostIndex::from(rows.clone());
        let probe = Tensor::<B, 2>::from_data(TensorData::new((0..10).map(|i| (i % 3) as f32 - 0.5).collect::<Vec<_>>(), [5, 2]), &device);
        let rows_t = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [5]), &device);
        let grad = |f: &dyn Fn(Tensor<B, 2>) -> Tensor<B, 2>| {
            let x = leaf(xv.clone(), [4, 2]);
            let g = (f(x.clone()) * probe.clone()).sum().backward();
            x.grad(&g).unwrap().into_data()
        };
        let want = grad(&|x| x.select(0, rows_t.clone()));
        grad(&|x| moe_permute(x, rows_t.clone())).assert_approx_eq::<f32>(&want, Tolerance::absolute(1e-6));
        grad(&|x| moe_permute_host(x, &host)).assert_approx_eq::<f32>(&want, Tolerance::absolute(1e-6));

        // Combine: 3 tokens, k = 2, over 6 sorted rows.
        let slots = vec![4i64, 1, 0, 5, 3, 2];
        let host = HostIndex::from(slots.clone());
        let slots_t = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [6]), &device);
        let yv: Vec<f32> = (0..12).map(|i| 0.5 - i as f32 * 0.125).collect();
        let wv = vec![0.7f32, 0.3, 0.4, 0.6, 0.9, 0.1];
        let probe = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, -2.0, 0.5, 3.0, -1.5, 0.25], [3, 2]), &device);
        let grads = |f: &dyn Fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>| {
            let (y, w) = (leaf(yv.clone(), [6, 2]), leaf(wv.clone(), [3, 2]));
            let g = (f(y.clone(), w.clone()) * probe.clone()).sum().backward();
            (y.grad(&g).unwrap().into_data(), w.grad(&g).unwrap().into_data())
        };
        let (dy, dw) = grads(&|y, w| moe_combine(y, slots_t.clone(), w));
        let (dy_h, dw_h) = grads(&|y, w| moe_combine_host(y, &host, w));
        dy_h.assert_approx_eq::<f32>(&dy, Tolerance::absolute(1e-6));
        dw_h.assert_approx_eq::<f32>(&dw, Tolerance::absolute(1e-6));
        // And against the definition: out[t] = Σ_j w[t, j] · y[slots[t·2 + j]].
        let (dy_ref, _) = grads(&|y, w| {
            let picked = y.select(0, slots_t.clone()).reshape([3, 2, 2]);
            (picked * w.reshape([3, 2, 1])).sum_dim(1).reshape([3, 2])
        });
        dy_h.assert_approx_eq::<f32>(&dy_ref, Tolerance::absolute(1e-6));
    }
}
