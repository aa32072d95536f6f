use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};
use burn_moe_backend::{DMoe, LocalDispatcher, MoeAuxStats, MoeBackend, TokenDispatcher, TokenMask};

use super::attention::MixtralAttention;
use super::rms_norm::RmsNorm;

/// One pre-norm decoder block: `x + attn(norm(x))`, then `h + moe(norm(h))`.
///
/// # Shapes
/// - input and output `[B, S, D]`
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Self-attention.
    pub self_attn: MixtralAttention<B>,
    /// Sparse MoE feed-forward (router + experts).
    pub mlp: DMoe<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MoE.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: MoeBackend> DecoderLayer<B> {
    /// Runs the block; also returns the MoE layer's load-balancing statistics (over the tokens that
    /// `mask` marks as real, all tokens without a mask).
    pub fn forward(&self, x: Tensor<B, 3>, mask: Option<&TokenMask<B>>) -> (Tensor<B, 3>, MoeAuxStats<B>) {
        self.forward_dispatched(x, mask, &LocalDispatcher)
    }

    /// [`forward`](Self::forward) with the experts computed by `dispatcher` (expert parallelism).
    pub fn forward_dispatched(
        &self,
        x: Tensor<B, 3>,
        mask: Option<&TokenMask<B>>,
        dispatcher: &dyn TokenDispatcher<B>,
    ) -> (Tensor<B, 3>, MoeAuxStats<B>) {
        let [b, s, d] = x.dims();
        let h = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x));
        let normed = self.post_attention_layernorm.forward(h.clone());
        let moe = self.mlp.forward_dispatched(normed.reshape([b * s, d]), mask, dispatcher);
        (h + moe.output.reshape([b, s, d]), moe.aux)
    }
}
