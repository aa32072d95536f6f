use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};
use burn_moe_backend::MoeBackend;

/// Root-mean-square layer norm as in HF Mixtral: `weight · x / sqrt(mean(x²) + eps)`.
///
/// # Shapes
/// - `weight`: `[D]`; input and output `[..., D]`
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel scale `[D]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm with unit scale.
    pub fn init(d: usize, eps: f64, device: &B::Device) -> Self {
        Self { weight: Param::from_tensor(Tensor::ones([d], device)), eps }
    }

    /// Wraps an existing scale.
    pub fn from_weight(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self::from_param(Param::from_tensor(weight), eps)
    }

    /// Wraps a scale parameter (which may be lazy: read from a checkpoint when first used).
    pub fn from_param(weight: Param<Tensor<B, 1>>, eps: f64) -> Self {
        Self { weight, eps }
    }
}

impl<B: MoeBackend> RmsNorm<B> {
    /// Normalises the last dimension, in f32 whatever the input's dtype (as HF), rounding back to it
    /// before the scale. One backend op with its own backward pass
    /// ([`moe_rms_norm`](burn_moe_backend::ops::moe_rms_norm)): a fused kernel on CubeCL backends,
    /// the same tensor ops as before elsewhere.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        burn_moe_backend::ops::moe_rms_norm(x, self.weight.val(), self.eps)
    }
}
