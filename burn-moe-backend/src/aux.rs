//! Load-balancing statistics of a dMoE layer and the Switch-Transformer auxiliary loss.

use burn::tensor::{Tensor, backend::Backend};

/// What a dMoE layer contributes to the load-balancing loss.
///
/// Kept as sums rather than a per-layer loss because the HF definition (transformers 5.x
/// `load_balancing_loss_func`) pools the token fractions and router probabilities over *all* layers
/// before multiplying them: the mean of per-layer losses is a different number.
///
/// # Shapes
/// - `prob_sum`: `[E]`, the router softmax summed over the layer's tokens (differentiable).
/// - `token_counts`: `[E]`, how many (token, slot) pairs each expert received (no gradient).
#[derive(Debug, Clone)]
pub struct MoeAuxStats<B: Backend> {
    /// Softmax probabilities summed over tokens, `[E]`.
    pub prob_sum: Tensor<B, 1>,
    /// Pairs routed to each expert, `[E]`, as floats.
    pub token_counts: Tensor<B, 1>,
    /// Number of tokens (rows) the sums run over.
    pub rows: usize,
}

impl<B: Backend> MoeAuxStats<B> {
    /// The auxiliary loss of this layer alone.
    pub fn loss(&self) -> Tensor<B, 1> {
        load_balancing_loss(std::slice::from_ref(self))
    }
}

/// HF's load-balancing loss over several layers:
/// `E · Σ_e (Σ_l count_le / N) · (Σ_l prob_le / N)` with `N` the total number of rows.
///
/// Returns a `[1]` tensor; zero when there are no rows.
pub fn load_balancing_loss<B: Backend>(stats: &[MoeAuxStats<B>]) -> Tensor<B, 1> {
    let first = stats.first().expect("load_balancing_loss needs at least one layer of statistics");
    let device = first.prob_sum.device();
    let num_experts = first.prob_sum.dims()[0];
    let rows: usize = stats.iter().map(|s| s.rows).sum();
    if rows == 0 {
        return Tensor::zeros([1], (&device, first.prob_sum.dtype()));
    }
    let counts = stats.iter().skip(1).fold(first.token_counts.clone(), |acc, s| acc + s.token_counts.clone());
    let probs = stats.iter().skip(1).fold(first.prob_sum.clone(), |acc, s| acc + s.prob_sum.clone());
    let n = rows as f64;
    (counts.div_scalar(n) * probs.div_scalar(n)).sum().mul_scalar(num_experts as f64)
}
