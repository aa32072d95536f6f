//! Reference dropless expert computation from standard Burn tensor ops.
//!
//! Runs on any backend (and under `Autodiff`, whose gradients come from the ops used here), so it is
//! the ground truth the CubeCL kernels are compared with. It reads the routing decisions back to the
//! host to build the expert segments, which costs a synchronisation per layer: acceptable for a
//! reference, and the reason the production kernels compute the plan on the device.

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData, activation::silu, backend::Backend};
use kernels_cubecl::RoutingPlan;

use crate::lora::DMoeLora;

/// Reads the router's choices `[T, k]` back to the host and groups the (token, slot) pairs by
/// expert: the plan every dropless path (reference, scatter, block-sparse) starts from.
pub(crate) fn host_routing_plan<B: Backend>(experts: Tensor<B, 2, Int>, num_experts: usize) -> RoutingPlan {
    let [_, top_k] = experts.dims();
    let indices: Vec<i64> = experts.into_data().iter::<i64>().collect();
    RoutingPlan::from_expert_indices(&indices, top_k, num_experts)
        .expect("router produced expert indices outside 0..num_experts")
}

/// A 1-d index tensor holding `v`.
pub(crate) fn index_tensor<B: Backend>(v: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// `out[t] = Σ_j weights[t, j] · expert_{experts[t, j]}(x[t])`, with SwiGLU experts, computed by
/// grouping the (token, slot) pairs by expert and running one matmul chain per non-empty segment.
/// No token is dropped and no expert sees padding.
///
/// # Shapes
/// - `x`: `[T, D]`
/// - `weights`: `[T, k]`
/// - `experts`: `[T, k]` (values in `0..E`)
/// - `w1`, `w3`: `[E, F, D]`; `w2`: `[E, D, F]`
/// - returns `[T, D]`
pub fn dropless_experts<B: Backend>(
    x: Tensor<B, 2>,
    weights: Tensor<B, 2>,
    experts: Tensor<B, 2, Int>,
    w1: Tensor<B, 3>,
    w3: Tensor<B, 3>,
    w2: Tensor<B, 3>,
) -> Tensor<B, 2> {
    dropless_experts_lora(x, weights, experts, w1, w3, w2, None)
}

/// [`dropless_experts`] with optional LoRA adapters on the three projections, each expert's delta
/// computed in its segment's loop iteration with plain matmuls (this is the reference path; the
/// other kernels use grouped matmuls).
///
/// # Shapes
/// As [`dropless_experts`].
pub fn dropless_experts_lora<B: Backend>(
    x: Tensor<B, 2>,
    weights: Tensor<B, 2>,
    experts: Tensor<B, 2, Int>,
    w1: Tensor<B, 3>,
    w3: Tensor<B, 3>,
    w2: Tensor<B, 3>,
    lora: Option<&DMoeLora<B>>,
) -> Tensor<B, 2> {
    let device = x.device();
    let [tokens, d_model] = x.dims();
    let [_, top_k] = experts.dims();
    let [num_experts, _, _] = w1.dims();
    if tokens == 0 {
        return Tensor::zeros([0, d_model], (&device, x.dtype()));
    }
    let plan = host_routing_plan(experts, num_experts);
    let pairs = tokens * top_k;
    let as_int = |v: &[usize]| index_tensor::<B>(v.iter().map(|&i| i as i64).collect(), &device);
    let sorted_token = as_int(&plan.sorted_token);
    let sorted_flat = as_int(&plan.sorted_flat);

    let x_sorted = x.select(0, sorted_token.clone());
    let y_sorted = segment_experts(x_sorted, &plan.offsets, w1, w3, w2, lora);
    let w_sorted = weights.reshape([pairs]).select(0, sorted_flat).reshape([pairs, 1]);
    let contrib = y_sorted * w_sorted;
    Tensor::zeros([tokens, d_model], (&device, contrib.dtype())).select_assign(0, sorted_token, contrib, IndexingUpdateOp::Add)
}

/// The SwiGLU experts on rows already grouped by expert (segment `e` is `offsets[e]..offsets[e+1]`),
/// one plain matmul chain per non-empty segment, with optional LoRA deltas. Zero rows give `[0, D]`.
///
/// # Shapes
/// - `x_sorted`: `[N, D]`; `w1`, `w3`: `[E, F, D]`; `w2`: `[E, D, F]` → `[N, D]`
pub fn segment_experts<B: Backend>(
    x_sorted: Tensor<B, 2>,
    offsets: &[usize],
    w1: Tensor<B, 3>,
    w3: Tensor<B, 3>,
    w2: Tensor<B, 3>,
    lora: Option<&DMoeLora<B>>,
) -> Tensor<B, 2> {
    let [rows, d_model] = x_sorted.dims();
    let [num_experts, d_ff, _] = w1.dims();
    if rows == 0 {
        // Still a function of the input, so the graph (and its collectives) look the same on
        // every rank whether or not this one received rows.
        return x_sorted;
    }
    // Each adapter draws its own dropout mask, as PEFT's per-module dropout does.
    let lora_in = lora.map(|l| (l.w1.dropout.forward(x_sorted.clone()), l.w3.dropout.forward(x_sorted.clone())));
    let mut segments = Vec::with_capacity(num_experts);
    for e in 0..num_experts {
        let (start, end) = (offsets[e], offsets[e + 1]);
        if start == end {
            continue;
        }
        let xe = x_sorted.clone().slice([start..end]);
        let w1e = w1.clone().slice([e..e + 1]).reshape([d_ff, d_model]);
        let w3e = w3.clone().slice([e..e + 1]).reshape([d_ff, d_model]);
        let w2e = w2.clone().slice([e..e + 1]).reshape([d_model, d_ff]);
        let mut gate = xe.clone().matmul(w1e.transpose());
        let mut up = xe.matmul(w3e.transpose());
        if let (Some(l), Some((x1, x3))) = (lora, lora_in.as_ref()) {
            gate = gate + l.w1.delta_expert(x1.clone().slice([start..end]), e);
            up = up + l.w3.delta_expert(x3.clone().slice([start..end]), e);
        }
        let h = silu(gate) * up;
        let mut y = h.clone().matmul(w2e.transpose());
        if let Some(l) = lora {
            y = y + l.w2.delta_expert(l.w2.dropout.forward(h), e);
        }
        segments.push(y);
    }
    Tensor::cat(segments, 0)
}
