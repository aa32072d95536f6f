use burn::tensor::{DType, Int, Tensor, activation::log_softmax, backend::Backend};

/// Label value whose position is left out of the loss (HF's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Next-token cross-entropy with the HF shift: position `t` predicts `labels[t + 1]`; the last
/// position and every `IGNORE_INDEX` label are left out.
///
/// Returns `(sum of token losses, number of target tokens)`, so that callers can normalise by a
/// global token count (gradient accumulation, data parallelism) instead of per batch.
///
/// # Shapes
/// - `logits`: `[B, S, V]`; `labels`: `[B, S]` (unshifted, as in HF)
/// - returns two `[1]` tensors
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, s, v] = logits.dims();
    let device = logits.device();
    let shifted = Tensor::cat(
        vec![labels.slice([0..b, 1..s]), Tensor::<B, 2, Int>::full([b, 1], IGNORE_INDEX, &device)],
        1,
    )
    .reshape([b * s, 1]);
    let ignored = shifted.clone().equal_elem(IGNORE_INDEX);
    let targets = shifted.mask_fill(ignored.clone(), 0);
    // In f32 whatever the logits' dtype (HF's loss upcasts them too): a bf16 log-softmax over 32k
    // entries would lose most of the loss's digits.
    let logp = log_softmax(logits.reshape([b * s, v]).cast(DType::F32), 1).gather(1, targets);
    let nll = logp.neg().mask_fill(ignored.clone(), 0.0);
    let count = ignored.bool_not().float().cast(DType::F32).sum();
    (nll.sum(), count)
}
