use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

/// A bias-free linear layer that stores its weight as PyTorch does, `[out, in]`, so checkpoints map
/// one to one (Burn's own `Linear` stores `[in, out]`).
///
/// # Shapes
/// - `weight`: `[out, in]`
/// - input `[..., in]` → output `[..., out]`
#[derive(Module, Debug)]
pub struct HfLinear<B: Backend> {
    /// Weight `[out, in]`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> HfLinear<B> {
    /// Wraps an existing `[out, in]` weight.
    pub fn from_weight(weight: Tensor<B, 2>) -> Self {
        Self { weight: Param::from_tensor(weight) }
    }

    /// `x · Wᵀ` on the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows = x.shape().num_elements() / d_in.max(1);
        let out = x.reshape([rows, d_in]).matmul(self.weight.val().transpose());
        let mut out_dims = dims;
        out_dims[D - 1] = self.weight.dims()[0];
        out.reshape(out_dims)
    }
}
