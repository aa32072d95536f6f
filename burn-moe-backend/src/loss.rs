//! The language-model loss as one backend op ([`MoeBackend::moe_cross_entropy`](crate::MoeBackend::moe_cross_entropy))
//! with its own backward pass: the defaults below are Burn tensor ops (any backend; the forward the
//! same operations as the reference model's loss), CubeCL backends run the fused kernels of
//! `kernels_cubecl::xent`.

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor, backend::Backend};

/// Rows whose target lies in `0..vocab`, and the targets with the others replaced by 0 (a valid
/// index for gathers).
fn valid_targets<B: Backend>(targets: Tensor<B, 1, Int>, vocab: usize) -> (Tensor<B, 1, burn::tensor::Bool>, Tensor<B, 1, Int>) {
    let valid = targets.clone().greater_equal_elem(0).bool_and(targets.clone().lower_elem(vocab as i64));
    let safe = targets.mask_fill(valid.clone().bool_not(), 0);
    (valid, safe)
}

/// `(nll, lse)` per row, both f32 whatever the logits' dtype: `lse = log Σ exp(logit)` and
/// `nll = −log_softmax(logits)[target]`, 0 for a target outside `0..vocab` (the ignore index −100).
/// Tensor ops: the default of [`MoeBackend::moe_cross_entropy`](crate::MoeBackend::moe_cross_entropy).
///
/// # Shapes
/// - `logits`: `[N, V]`, `targets`: `[N]` → `[N]` and `[N]`
pub fn cross_entropy_ops<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [n, v] = logits.dims();
    let (valid, safe) = valid_targets(targets, v);
    // In f32 (HF's loss upcasts too): a bf16 log-softmax over 32k entries would lose most digits.
    let x = logits.cast(DType::F32);
    let logp = log_softmax(x.clone(), 1);
    let nll = logp.clone().gather(1, safe.reshape([n, 1])).reshape([n]).neg().mask_fill(valid.bool_not(), 0.0);
    let max = x.clone().max_dim(1);
    let lse = (max.clone() + (x - max).exp().sum_dim(1).log()).reshape([n]);
    (nll, lse)
}

/// `dlogits = dnll · (softmax − onehot(target))` in the logits' dtype, zero rows for ignored
/// targets, from the forward pass's `lse`. Tensor ops: the default of
/// [`MoeBackend::moe_cross_entropy_backward`](crate::MoeBackend::moe_cross_entropy_backward).
///
/// # Shapes
/// - `logits`: `[N, V]`, `targets`, `lse`, `dnll`: `[N]` → `[N, V]`
pub fn cross_entropy_backward_ops<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    lse: Tensor<B, 1>,
    dnll: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let [n, v] = logits.dims();
    let dtype = logits.dtype();
    let (valid, safe) = valid_targets(targets, v);
    let probs = (logits.cast(DType::F32) - lse.cast(DType::F32).reshape([n, 1])).exp();
    let onehot = safe.one_hot::<2>(v).float().cast(DType::F32);
    let scale = dnll.cast(DType::F32).mask_fill(valid.bool_not(), 0.0).reshape([n, 1]);
    ((probs - onehot) * scale).cast(dtype)
}
