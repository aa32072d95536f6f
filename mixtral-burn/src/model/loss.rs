use burn::tensor::{DType, Int, Tensor};
use burn_moe_backend::MoeBackend;

/// Label value whose position is left out of the loss (HF's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Next-token cross-entropy with the HF shift: position `t` predicts `labels[t + 1]`; the last
/// position and every `IGNORE_INDEX` label are left out.
///
/// Returns `(sum of token losses, number of target tokens)`, so that callers can normalise by a
/// global token count (gradient accumulation, data parallelism) instead of per batch. Labels are
/// token ids of the model's vocabulary (the trainer's tokenizers are checked against it when
/// loaded) or `IGNORE_INDEX`.
///
/// # Shapes
/// - `logits`: `[B, S, V]`; `labels`: `[B, S]` (unshifted, as in HF)
/// - returns two `[1]` tensors
pub fn causal_lm_loss<B: MoeBackend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, s, v] = logits.dims();
    let device = logits.device();
    let shifted = Tensor::cat(
        vec![labels.slice([0..b, 1..s]), Tensor::<B, 2, Int>::full([b, 1], IGNORE_INDEX, &device)],
        1,
    )
    .reshape([b * s]);
    let count = shifted.clone().not_equal_elem(IGNORE_INDEX).float().cast(DType::F32).sum();
    // One op, in f32 whatever the logits' dtype (HF's loss upcasts them too: a bf16 log-softmax over
    // 32k entries would lose most of the loss's digits); ignored positions give 0. A fused kernel
    // on CubeCL backends, the log-softmax of before elsewhere.
    let nll = burn_moe_backend::ops::moe_cross_entropy(logits.reshape([b * s, v]), shifted);
    (nll.sum(), count)
}
