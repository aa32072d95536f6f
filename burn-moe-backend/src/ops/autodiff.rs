//! `Autodiff<B>` for [`MoeBackend`]: each op records a backward pass made of the adjoint ops, run on
//! the inner backend (so CubeCL backends differentiate with their own kernels).
//!
//! | forward | d(input) | d(weight) |
//! | --- | --- | --- |
//! | `permute(x, rows)` | scatter-add of `dy` into `rows` | — |
//! | `grouped_matmul(x, w, ᵀ)` | `grouped_matmul(dy, w, no ᵀ)` | `weight_grad(dy, x)` |
//! | `grouped_matmul(x, w, no ᵀ)` | `grouped_matmul(dy, w, ᵀ)` | `weight_grad(x, dy)` |
//! | `combine(y, slots, wts)` | `wts · dy` scattered to `slots` | `⟨y[slots], dy⟩` |
//! | `swiglu(gate, up)` | `swiglu_backward(gate, up, dh)` | — |
//! | `sdd(x, w, ᵀ)` | `dsd(dy, w, no ᵀ)` | `dstd(dy, x)` |
//! | `sdd(x, w, no ᵀ)` | `dsd(dy, w, ᵀ)` | `dstd(dy, x, out ᵀ)` |
//! | `dsd(s, w, ᵀ)` | `sdd(dy, w, no ᵀ)` | `dstd(s, dy, out ᵀ)` |
//! | `dsd(s, w, no ᵀ)` | `sdd(dy, w, ᵀ)` | `dstd(s, dy)` |

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorMetadata, TensorPrimitive, backend::Backend};
use kernels_cubecl::BlockSparseTopology;

use super::backend::MoeBackend;
use super::scatter_add::scatter_add_rows;

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

impl<B: MoeBackend, C: CheckpointStrategy> MoeBackend for Autodiff<B, C> {
    fn moe_permute(x: FloatTensor<Self>, rows: IntTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PermuteBackward;

        impl<B: MoeBackend> Backward<B, 1> for PermuteBackward {
            type State = (IntTensor<B>, usize);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_x] = ops.parents;
                let dy: Tensor<B, 2> = float(grads.consume::<B>(&ops.node));
                let (rows, num_rows) = ops.state;
                if let Some(node) = node_x {
                    let rows = Tensor::<B, 1, Int>::from_primitive(rows);
                    let dx = scatter_add_rows(dy, rows, num_rows);
                    grads.register::<B>(node.id, prim(dx));
                }
            }
        }

        let num_rows = x.primitive.shape()[0];
        match PermuteBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((rows.clone(), num_rows), B::moe_permute(x.primitive, rows)),
            OpsKind::UnTracked(prep) => prep.finish(B::moe_permute(x.primitive, rows)),
        }
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
        #[derive(Debug)]
        struct CombineBackward;

        impl<B: MoeBackend> Backward<B, 2> for CombineBackward {
            type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_y, node_w] = ops.parents;
                let dout: Tensor<B, 2> = float(grads.consume::<B>(&ops.node));
                let (y, slots, weights) = ops.state;
                let y: Tensor<B, 2> = float(y);
                let weights: Tensor<B, 2> = float(weights);
                let slots = Tensor::<B, 1, Int>::from_primitive(slots);
                let [t, k] = weights.dims();
                let [n, d] = y.dims();
                if let Some(node) = node_w {
                    let picked = y.select(0, slots.clone()).reshape([t, k, d]);
                    let dw = (picked * dout.clone().reshape([t, 1, d])).sum_dim(2).reshape([t, k]);
                    grads.register::<B>(node.id, prim(dw));
                }
                if let Some(node) = node_y {
                    let contrib = (dout.reshape([t, 1, d]) * weights.reshape([t, k, 1])).reshape([t * k, d]);
                    let dy = scatter_add_rows(contrib, slots, n);
                    grads.register::<B>(node.id, prim(dy));
                }
            }
        }

        match CombineBackward.prepare::<C>([y.node.clone(), weights.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::moe_combine(y.primitive.clone(), slots.clone(), weights.primitive.clone());
                prep.finish((y.primitive, slots, weights.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_combine(y.primitive, slots, weights.primitive)),
        }
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
}
