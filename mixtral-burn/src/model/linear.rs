use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{Tensor, backend::Backend};
use burn_moe_backend::ops::moe_linear;
use burn_moe_backend::{LoraConfig, MoeBackend};

/// A bias-free linear layer that stores its weight as PyTorch does, `[out, in]`, so checkpoints map
/// one to one (Burn's own `Linear` stores `[in, out]`), with an optional LoRA adapter.
///
/// # Shapes
/// - `weight`: `[out, in]`
/// - input `[..., in]` → output `[..., out]`
#[derive(Module, Debug)]
pub struct HfLinear<B: Backend> {
    /// Weight `[out, in]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Optional low-rank adapter (see [`with_lora`](HfLinear::with_lora)).
    pub lora: Option<LinearLora<B>>,
}

/// A LoRA adapter of one linear layer: adds `s · dropout(x) · Aᵀ · Bᵀ` with `s = α / r` (PEFT).
///
/// # Shapes
/// - `a`: `[r, in]` (uniform `±1/√in`), `b`: `[out, r]` (zero at initialisation)
#[derive(Module, Debug)]
pub struct LinearLora<B: Backend> {
    /// Down projection `A`.
    pub a: Param<Tensor<B, 2>>,
    /// Up projection `B`.
    pub b: Param<Tensor<B, 2>>,
    /// `α / r`.
    pub scaling: f64,
    /// Dropout on the adapter input (active only under autodiff).
    pub dropout: Dropout,
}

impl<B: Backend> LinearLora<B> {
    /// Fresh adapter for a `[out, in]` weight; `A` comes from a host RNG seeded with `seed`.
    pub fn init(config: &LoraConfig, d_in: usize, d_out: usize, seed: u64, device: &B::Device) -> Self {
        Self {
            a: Param::from_tensor(config.init_a::<B>(1, d_in, seed, device).reshape([config.r, d_in])),
            b: Param::from_tensor(Tensor::zeros([d_out, config.r], device)),
            scaling: config.scaling(),
            dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    /// `s · B · A`, the adapter's contribution to the weight `[out, in]`.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.b.val().matmul(self.a.val()) * self.scaling
    }
}

impl<B: Backend> HfLinear<B> {
    /// Wraps an existing `[out, in]` weight.
    pub fn from_weight(weight: Tensor<B, 2>) -> Self {
        Self::from_param(Param::from_tensor(weight))
    }

    /// Wraps a `[out, in]` weight parameter (which may be lazy: read from a checkpoint when first used).
    pub fn from_param(weight: Param<Tensor<B, 2>>) -> Self {
        Self { weight, lora: None }
    }

    /// Freezes the weight (`require_grad = false`) and attaches a fresh adapter (zero `B`: the output
    /// is unchanged until it is trained).
    pub fn with_lora(self, config: &LoraConfig, seed: u64) -> Self {
        // Shape and device without reading the weight: it may still be lazy.
        let [d_out, d_in] = self.weight.lazy_shape().dims();
        let device = self.weight.lazy_device();
        let mut frozen = burn_moe_backend::freeze(self);
        frozen.lora = Some(LinearLora::init(config, d_in, d_out, seed, &device));
        frozen
    }

    /// Folds the adapter into the weight (`W + s·B·A`) and drops it.
    pub fn merge_lora(self) -> Self {
        match &self.lora {
            None => self,
            // Detached: the merged weight is a new leaf (under autodiff, a sum is not one). In the
            // adapter's dtype: under mixed precision the frozen base may be bf16 while the trained
            // adapter is f32, and the sum should not round the update to the base's precision.
            Some(l) => {
                let delta = l.delta_weight();
                Self::from_weight((self.weight.val().cast(delta.dtype()) + delta).detach())
            }
        }
    }
}

impl<B: MoeBackend> HfLinear<B> {
    /// `x · Wᵀ (+ s · dropout(x) · Aᵀ · Bᵀ)` on the last dimension. The base product goes through
    /// [`moe_linear`] (the tensor-core grouped GEMMs on CubeCL backends); the adapter's thin
    /// products stay Burn matmuls.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows = x.shape().num_elements() / d_in.max(1);
        let x = x.reshape([rows, d_in]);
        let mut out = moe_linear(x.clone(), self.weight.val());
        if let Some(l) = &self.lora {
            let low = l.dropout.forward(x).matmul(l.a.val().transpose());
            out = out + low.matmul(l.b.val().transpose()) * l.scaling;
        }
        let mut out_dims = dims;
        out_dims[D - 1] = self.weight.dims()[0];
        out.reshape(out_dims)
    }
}
