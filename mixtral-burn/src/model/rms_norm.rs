use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor, backend::Backend};

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

    /// Normalises the last dimension, in f32 whatever the input's dtype (as HF), rounding back to it
    /// before the scale.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = (x * variance.add_scalar(self.eps).sqrt().recip()).cast(dtype);
        let mut shape = [1usize; D];
        shape[D - 1] = self.weight.dims()[0];
        normed * self.weight.val().reshape(shape)
    }
}
