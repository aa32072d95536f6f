//! [`MoeBackend`] for the fusion wrapper (`burn::backend::{Cuda, Wgpu}` are `Fusion<CubeBackend<..>>`).
//!
//! Each MoE op is registered in the fusion stream as a custom operation that runs the *inner*
//! backend's op (the CubeCL kernels) on the inner tensors when the stream executes. Without this the
//! wrapper would fall back to the trait's standard-op defaults — correct, but they are the slow
//! reference path, so a user on the default `Wgpu`/`Cuda` backends would silently lose the kernels.
//! The fusion engine cannot fuse through a custom op; the elementwise work around it (router softmax,
//! residuals) still fuses on either side.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::DType;
use burn::tensor::Shape;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use kernels_cubecl::{BlockSparseTopology, SoftmaxBlock};

use super::backend::MoeBackend;

/// One MoE op with its host-side arguments (segment offsets, topologies), replayed on the inner
/// backend by [`MoeCustomOp::execute`]. Inputs and outputs travel in the op's [`CustomOpIr`], in the
/// order of the corresponding [`MoeBackend`] method's arguments and results.
#[derive(Debug, Clone)]
enum MoeOp {
    Permute,
    GroupedMatmul { offsets: Arc<[usize]>, transpose: bool },
    GroupedMatmulWeightGrad { offsets: Arc<[usize]> },
    Combine,
    Swiglu,
    SwigluBackward,
    Sdd { topology: Arc<BlockSparseTopology>, transpose: bool },
    Dsd { topology: Arc<BlockSparseTopology>, transpose: bool },
    Dstd { topology: Arc<BlockSparseTopology>, transpose_out: bool },
    AttentionSoftmax { block: SoftmaxBlock },
    AttentionSoftmaxBackward { block: SoftmaxBlock },
    RmsNorm { eps: f64 },
    RmsNormBackward { weight_grad: bool },
    CrossEntropy,
    CrossEntropyBackward,
    CombineBackward,
    GateLogits,
    GateWeightGrad,
}

/// The ops' ids, in [`MoeOp::index`] order.
const OP_NAMES: [&str; 18] = [
    "moe_permute",
    "moe_grouped_matmul",
    "moe_grouped_matmul_weight_grad",
    "moe_combine",
    "moe_swiglu",
    "moe_swiglu_backward",
    "moe_sdd",
    "moe_dsd",
    "moe_dstd",
    "moe_attention_softmax",
    "moe_attention_softmax_backward",
    "moe_rms_norm",
    "moe_rms_norm_backward",
    "moe_cross_entropy",
    "moe_cross_entropy_backward",
    "moe_combine_backward",
    "moe_gate_logits",
    "moe_gate_weight_grad",
];

/// How many times each op has run on the inner backend through the fusion stream, process-wide.
static EXECUTED: [AtomicU64; 18] = [const { AtomicU64::new(0) }; 18];

/// How many times the MoE op `name` (`"moe_grouped_matmul"`, `"moe_sdd"`, ... — the [`MoeBackend`]
/// method names) has executed as a fusion custom op on the inner backend in this process; `None`
/// for an unknown name. A diagnostic: a model on `burn::backend::{Wgpu, Cuda}` whose counts stay at
/// zero is not reaching the CubeCL kernels.
pub fn fused_moe_op_count(name: &str) -> Option<u64> {
    OP_NAMES.iter().position(|n| *n == name).map(|i| EXECUTED[i].load(Ordering::Relaxed))
}

impl MoeOp {
    fn index(&self) -> usize {
        match self {
            MoeOp::Permute => 0,
            MoeOp::GroupedMatmul { .. } => 1,
            MoeOp::GroupedMatmulWeightGrad { .. } => 2,
            MoeOp::Combine => 3,
            MoeOp::Swiglu => 4,
            MoeOp::SwigluBackward => 5,
            MoeOp::Sdd { .. } => 6,
            MoeOp::Dsd { .. } => 7,
            MoeOp::Dstd { .. } => 8,
            MoeOp::AttentionSoftmax { .. } => 9,
            MoeOp::AttentionSoftmaxBackward { .. } => 10,
            MoeOp::RmsNorm { .. } => 11,
            MoeOp::RmsNormBackward { .. } => 12,
            MoeOp::CrossEntropy => 13,
            MoeOp::CrossEntropyBackward => 14,
            MoeOp::CombineBackward => 15,
            MoeOp::GateLogits => 16,
            MoeOp::GateWeightGrad => 17,
        }
    }

    /// The custom op's id in the fusion stream (shown in fusion traces).
    fn name(&self) -> &'static str {
        OP_NAMES[self.index()]
    }
}

#[derive(Debug)]
struct MoeCustomOp<B> {
    desc: CustomOpIr,
    op: MoeOp,
    _backend: PhantomData<B>,
}

type Handles<B> = HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

impl<B: FusionBackend + MoeBackend> Operation<B::FusionRuntime> for MoeCustomOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let (ins, outs) = (&self.desc.inputs, &self.desc.outputs);
        let float = |i: usize, h: &mut Handles<B>| h.get_float_tensor::<B>(&ins[i]);
        let out = match &self.op {
            MoeOp::Permute => {
                let x = float(0, handles);
                let rows = handles.get_int_tensor::<B>(&ins[1]);
                B::moe_permute(x, rows)
            }
            MoeOp::GroupedMatmul { offsets, transpose } => {
                let (x, w) = (float(0, handles), float(1, handles));
                B::moe_grouped_matmul(x, w, offsets, *transpose)
            }
            MoeOp::GroupedMatmulWeightGrad { offsets } => {
                let (dy, x) = (float(0, handles), float(1, handles));
                B::moe_grouped_matmul_weight_grad(dy, x, offsets)
            }
            MoeOp::Combine => {
                let y = float(0, handles);
                let slots = handles.get_int_tensor::<B>(&ins[1]);
                let weights = float(2, handles);
                B::moe_combine(y, slots, weights)
            }
            MoeOp::Swiglu => {
                let (gate, up) = (float(0, handles), float(1, handles));
                B::moe_swiglu(gate, up)
            }
            MoeOp::GateLogits => {
                let (x, gate) = (float(0, handles), float(1, handles));
                B::moe_gate_logits(x, gate)
            }
            MoeOp::GateWeightGrad => {
                let (dlogits, x) = (float(0, handles), float(1, handles));
                B::moe_gate_weight_grad(dlogits, x)
            }
            MoeOp::CombineBackward => {
                let (dout, y) = (float(0, handles), float(1, handles));
                let slots = handles.get_int_tensor::<B>(&ins[2]);
                let weights = float(3, handles);
                let (dy, dweights) = B::moe_combine_backward(dout, y, slots, weights);
                handles.register_float_tensor::<B>(&outs[1].id, dweights);
                dy
            }
            MoeOp::SwigluBackward => {
                let (gate, up, dh) = (float(0, handles), float(1, handles), float(2, handles));
                let (d_gate, d_up) = B::moe_swiglu_backward(gate, up, dh);
                handles.register_float_tensor::<B>(&outs[1].id, d_up);
                d_gate
            }
            MoeOp::Sdd { topology, transpose } => {
                let (x, w) = (float(0, handles), float(1, handles));
                B::moe_sdd(x, w, topology, *transpose)
            }
            MoeOp::Dsd { topology, transpose } => {
                let (s, w) = (float(0, handles), float(1, handles));
                B::moe_dsd(s, w, topology, *transpose)
            }
            MoeOp::Dstd { topology, transpose_out } => {
                let (s, d) = (float(0, handles), float(1, handles));
                B::moe_dstd(s, d, topology, *transpose_out)
            }
            MoeOp::AttentionSoftmax { block } => {
                let (probs, lse) = B::moe_attention_softmax(float(0, handles), block);
                handles.register_float_tensor::<B>(&outs[1].id, lse);
                probs
            }
            MoeOp::AttentionSoftmaxBackward { block } => {
                let (scores, dprobs) = (float(0, handles), float(1, handles));
                let (lse, correction) = (float(2, handles), float(3, handles));
                let (probs, d_scores) = B::moe_attention_softmax_backward(scores, dprobs, lse, correction, block);
                handles.register_float_tensor::<B>(&outs[1].id, d_scores);
                probs
            }
            MoeOp::RmsNorm { eps } => {
                let (y, rstd) = B::moe_rms_norm(float(0, handles), float(1, handles), *eps);
                handles.register_float_tensor::<B>(&outs[1].id, rstd);
                y
            }
            MoeOp::RmsNormBackward { weight_grad } => {
                let (x, weight, rstd, dy) = (float(0, handles), float(1, handles), float(2, handles), float(3, handles));
                let (dx, dw) = B::moe_rms_norm_backward(x, weight, rstd, dy, *weight_grad);
                if let Some(dw) = dw {
                    handles.register_float_tensor::<B>(&outs[1].id, dw);
                }
                dx
            }
            MoeOp::CrossEntropy => {
                let logits = float(0, handles);
                let targets = handles.get_int_tensor::<B>(&ins[1]);
                let (nll, lse) = B::moe_cross_entropy(logits, targets);
                handles.register_float_tensor::<B>(&outs[1].id, lse);
                nll
            }
            MoeOp::CrossEntropyBackward => {
                let logits = float(0, handles);
                let targets = handles.get_int_tensor::<B>(&ins[1]);
                B::moe_cross_entropy_backward(logits, targets, float(2, handles), float(3, handles))
            }
        };
        handles.register_float_tensor::<B>(&outs[0].id, out);
        EXECUTED[self.op.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// Registers `op` on the stream of `inputs` with outputs of the given shapes and dtypes, and returns
/// the output tensors (executed lazily, in stream order, like every fused op).
fn register<B: FusionBackend + MoeBackend>(
    op: MoeOp,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: Vec<(Shape, DType)>,
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(&inputs);
    let outputs = outputs.into_iter().map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype)).collect();
    let inputs = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr { id: op.name().to_owned(), inputs, outputs };
    client.register(streams, OperationIr::Custom(desc.clone()), MoeCustomOp::<B> { desc, op, _backend: PhantomData })
}

fn one<T>(mut tensors: Vec<T>) -> T {
    tensors.remove(0)
}

/// The two outputs of an op registered with two.
fn two<T>(mut tensors: Vec<T>) -> (T, T) {
    let second = tensors.pop().expect("two outputs registered");
    (tensors.pop().expect("two outputs registered"), second)
}

impl<B: FusionBackend + MoeBackend> MoeBackend for Fusion<B> {
    fn moe_permute(x: FloatTensor<Self>, rows: IntTensor<Self>) -> FloatTensor<Self> {
        let out = (Shape::new([rows.shape[0], x.shape[1]]), x.dtype);
        one(register::<B>(MoeOp::Permute, vec![x, rows], vec![out]))
    }

    fn moe_grouped_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>, offsets: &[usize], transpose: bool) -> FloatTensor<Self> {
        let m = if transpose { w.shape[1] } else { w.shape[2] };
        let out = (Shape::new([x.shape[0], m]), x.dtype);
        let op = MoeOp::GroupedMatmul { offsets: offsets.into(), transpose };
        one(register::<B>(op, vec![x, w], vec![out]))
    }

    fn moe_grouped_matmul_weight_grad(dy: FloatTensor<Self>, x: FloatTensor<Self>, offsets: &[usize]) -> FloatTensor<Self> {
        let experts = offsets.len().saturating_sub(1);
        let out = (Shape::new([experts, dy.shape[1], x.shape[1]]), dy.dtype);
        let op = MoeOp::GroupedMatmulWeightGrad { offsets: offsets.into() };
        one(register::<B>(op, vec![dy, x], vec![out]))
    }

    fn moe_combine(y: FloatTensor<Self>, slots: IntTensor<Self>, weights: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = (Shape::new([weights.shape[0], y.shape[1]]), y.dtype);
        one(register::<B>(MoeOp::Combine, vec![y, slots, weights], vec![out]))
    }

    fn moe_gate_logits(x: FloatTensor<Self>, gate: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = (Shape::new([x.shape[0], gate.shape[0]]), x.dtype);
        one(register::<B>(MoeOp::GateLogits, vec![x, gate], vec![out]))
    }

    fn moe_gate_weight_grad(dlogits: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = (Shape::new([dlogits.shape[1], x.shape[1]]), x.dtype);
        one(register::<B>(MoeOp::GateWeightGrad, vec![dlogits, x], vec![out]))
    }

    fn moe_combine_backward(
        dout: FloatTensor<Self>,
        y: FloatTensor<Self>,
        slots: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let dy = (y.shape.clone(), y.dtype);
        let dweights = (weights.shape.clone(), weights.dtype);
        two(register::<B>(MoeOp::CombineBackward, vec![dout, y, slots, weights], vec![dy, dweights]))
    }

    fn moe_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = (gate.shape.clone(), gate.dtype);
        one(register::<B>(MoeOp::Swiglu, vec![gate, up], vec![out]))
    }

    fn moe_swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, dh: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let out = (gate.shape.clone(), gate.dtype);
        two(register::<B>(MoeOp::SwigluBackward, vec![gate, up, dh], vec![out.clone(), out]))
    }

    fn moe_sdd(x: FloatTensor<Self>, w: FloatTensor<Self>, topology: &BlockSparseTopology, transpose: bool) -> FloatTensor<Self> {
        let bs = topology.block();
        let out = (Shape::new([topology.nnz(), bs, bs]), x.dtype);
        let op = MoeOp::Sdd { topology: Arc::new(topology.clone()), transpose };
        one(register::<B>(op, vec![x, w], vec![out]))
    }

    fn moe_dsd(s: FloatTensor<Self>, w: FloatTensor<Self>, topology: &BlockSparseTopology, transpose: bool) -> FloatTensor<Self> {
        let m = if transpose { w.shape[1] } else { w.shape[2] };
        let out = (Shape::new([topology.rows(), m]), s.dtype);
        let op = MoeOp::Dsd { topology: Arc::new(topology.clone()), transpose };
        one(register::<B>(op, vec![s, w], vec![out]))
    }

    fn moe_attention_softmax(scores: FloatTensor<Self>, block: &SoftmaxBlock) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // The log-sum-exps are f32 whatever the scores' dtype (the CubeCL kernel's output).
        let outputs = vec![(Shape::new([block.rows, block.keys]), scores.dtype), (Shape::new([block.rows]), DType::F32)];
        two(register::<B>(MoeOp::AttentionSoftmax { block: *block }, vec![scores], outputs))
    }

    fn moe_attention_softmax_backward(
        scores: FloatTensor<Self>,
        dprobs: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        correction: FloatTensor<Self>,
        block: &SoftmaxBlock,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let out = (Shape::new([block.rows, block.keys]), scores.dtype);
        let op = MoeOp::AttentionSoftmaxBackward { block: *block };
        two(register::<B>(op, vec![scores, dprobs, lse, correction], vec![out.clone(), out]))
    }

    fn moe_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // rstd is f32 whatever the activations' dtype (the CubeCL kernel's output).
        let outputs = vec![(x.shape.clone(), x.dtype), (Shape::new([x.shape[0]]), DType::F32)];
        two(register::<B>(MoeOp::RmsNorm { eps }, vec![x, weight], outputs))
    }

    fn moe_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let mut outputs = vec![(x.shape.clone(), x.dtype)];
        if weight_grad {
            outputs.push((weight.shape.clone(), weight.dtype));
        }
        let mut out = register::<B>(MoeOp::RmsNormBackward { weight_grad }, vec![x, weight, rstd, dy], outputs);
        let dw = weight_grad.then(|| out.pop().expect("two outputs registered"));
        (one(out), dw)
    }

    fn moe_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // Both per-row outputs are f32 whatever the logits' dtype (the CubeCL kernel's outputs).
        let row = (Shape::new([logits.shape[0]]), DType::F32);
        two(register::<B>(MoeOp::CrossEntropy, vec![logits, targets], vec![row.clone(), row]))
    }

    fn moe_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dnll: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let out = (logits.shape.clone(), logits.dtype);
        one(register::<B>(MoeOp::CrossEntropyBackward, vec![logits, targets, lse, dnll], vec![out]))
    }

    fn moe_dstd(s: FloatTensor<Self>, d: FloatTensor<Self>, topology: &BlockSparseTopology, transpose_out: bool) -> FloatTensor<Self> {
        let (e, f, m) = (topology.num_experts(), topology.ffn(), d.shape[1]);
        let shape = if transpose_out { [e, m, f] } else { [e, f, m] };
        let out = (Shape::new(shape), s.dtype);
        let op = MoeOp::Dstd { topology: Arc::new(topology.clone()), transpose_out };
        one(register::<B>(op, vec![s, d], vec![out]))
    }
}
