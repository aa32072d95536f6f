//! Low-rank adapters (LoRA) for the stacked expert weights of a [`DMoe`](crate::DMoe).
//!
//! A frozen projection `y = x · Wᵀ` becomes `y = x · Wᵀ + s · dropout(x) · Aᵀ · Bᵀ` with `s = α / r`,
//! `A: [r, in]` drawn like PEFT's `kaiming_uniform_(a = √5)` (uniform in `±1/√in`) and `B: [out, r]`
//! zero, so a freshly adapted layer computes exactly what the base layer computes.
//!
//! For experts, each expert `e` has its own `A[e]` and `B[e]`, stacked as `[E, r, in]` and
//! `[E, out, r]`. The delta of the rows routed to expert `e` is a pair of grouped matmuls over the same
//! expert segments as the base weights ([`ExpertLora::delta_grouped`]), so it runs through the
//! [`MoeBackend`] kernels and their adjoint backward passes.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::ops::{MoeBackend, moe_grouped_matmul};

/// Hyper-parameters of LoRA adapters.
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of the adapters.
    #[config(default = 16)]
    pub r: usize,
    /// Scale numerator `α`: deltas are multiplied by `α / r`.
    #[config(default = 32.0)]
    pub alpha: f64,
    /// Dropout probability on the adapter input (active only under autodiff, as in training).
    #[config(default = 0.05)]
    pub dropout: f64,
}

impl LoraConfig {
    /// The delta's scale `α / r`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Checks `r ≥ 1`, a finite `α` and `0 ≤ dropout < 1`.
    pub fn validate(&self) -> Result<(), LoraConfigError> {
        if self.r == 0 {
            return Err(LoraConfigError::Rank);
        }
        if !self.alpha.is_finite() {
            return Err(LoraConfigError::Alpha(self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraConfigError::Dropout(self.dropout));
        }
        Ok(())
    }

    /// PEFT's `A` initialisation from a host RNG seeded with `seed`: uniform in `±1/√in`, the same
    /// values on every backend and in every process.
    ///
    /// # Shapes
    /// → `[n, r, in]` (`n` stacked matrices)
    pub fn init_a<B: Backend>(&self, n: usize, d_in: usize, seed: u64, device: &B::Device) -> Tensor<B, 3> {
        let bound = 1.0 / (d_in.max(1) as f64).sqrt();
        let mut rng = SplitMix64(seed ^ 0x10A4_A11C_E5EE_D000);
        let values: Vec<f32> = (0..n * self.r * d_in).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
        Tensor::from_data(TensorData::new(values, [n, self.r, d_in]), device)
    }
}

/// An invalid [`LoraConfig`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoraConfigError {
    /// `r == 0`.
    #[error("LoRA rank r must be at least 1, got 0")]
    Rank,
    /// `α` is NaN or infinite.
    #[error("LoRA alpha must be finite, got {0}")]
    Alpha(f64),
    /// Dropout outside `[0, 1)`.
    #[error("LoRA dropout must be in [0, 1), got {0}")]
    Dropout(f64),
}

/// Host uniform generator (SplitMix64): adapter initialisation must not depend on the process-global
/// backend RNG, so that every data-parallel rank draws the same adapters.
struct SplitMix64(u64);

impl SplitMix64 {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Per-expert LoRA adapters of one stacked projection `W: [E, out, in]`.
///
/// # Shapes
/// - `a`: `[E, r, in]`
/// - `b`: `[E, out, r]`
#[derive(Module, Debug)]
pub struct ExpertLora<B: Backend> {
    /// Down projections `A`.
    pub a: Param<Tensor<B, 3>>,
    /// Up projections `B` (zero at initialisation).
    pub b: Param<Tensor<B, 3>>,
    /// `α / r`.
    pub scaling: f64,
    /// Dropout on the adapter input.
    pub dropout: Dropout,
}

impl<B: Backend> ExpertLora<B> {
    /// Fresh adapters for `num_experts` projections `[out, in]`: random `A` (seeded), zero `B`.
    pub fn init(config: &LoraConfig, num_experts: usize, d_in: usize, d_out: usize, seed: u64, device: &B::Device) -> Self {
        Self {
            a: Param::from_tensor(config.init_a(num_experts, d_in, seed, device)),
            b: Param::from_tensor(Tensor::zeros([num_experts, d_out, config.r], device)),
            scaling: config.scaling(),
            dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    /// `s · B[e] · A[e]` for every expert, the adapters' contribution to the weights `[E, out, in]`
    /// (what merging folds in).
    pub fn delta_weight(&self) -> Tensor<B, 3> {
        self.b.val().matmul(self.a.val()) * self.scaling
    }

    /// The delta of expert `e` on its rows, with plain tensor ops (the reference path).
    ///
    /// # Shapes
    /// - `x`: `[n, in]` (already dropped out) → `[n, out]`
    pub fn delta_expert(&self, x: Tensor<B, 2>, e: usize) -> Tensor<B, 2> {
        let [_, r, d_in] = self.a.dims();
        let [_, d_out, _] = self.b.dims();
        let a = self.a.val().slice([e..e + 1]).reshape([r, d_in]);
        let b = self.b.val().slice([e..e + 1]).reshape([d_out, r]);
        x.matmul(a.transpose()).matmul(b.transpose()) * self.scaling
    }
}

impl<B: MoeBackend> ExpertLora<B> {
    /// `s · dropout(x)[seg e] · A[e]ᵀ · B[e]ᵀ` for every expert segment `e` of the rows `x` (sorted by
    /// expert, segment boundaries `offsets`), as two grouped matmuls.
    ///
    /// # Shapes
    /// - `x`: `[N, in]`, `offsets`: `E + 1` entries ending at `N` → `[N, out]`
    pub fn delta_grouped(&self, x: Tensor<B, 2>, offsets: &[usize]) -> Tensor<B, 2> {
        let x = self.dropout.forward(x);
        let low = moe_grouped_matmul(x, self.a.val(), offsets, true);
        moe_grouped_matmul(low, self.b.val(), offsets, true) * self.scaling
    }
}

/// LoRA adapters of a [`DMoe`](crate::DMoe)'s three expert projections (the router is not adapted).
///
/// # Shapes
/// - `w1`, `w3`: `a [E, r, D]`, `b [E, F, r]`
/// - `w2`: `a [E, r, F]`, `b [E, D, r]`
#[derive(Module, Debug)]
pub struct DMoeLora<B: Backend> {
    /// Adapters of the gate projections.
    pub w1: ExpertLora<B>,
    /// Adapters of the up projections.
    pub w3: ExpertLora<B>,
    /// Adapters of the down projections.
    pub w2: ExpertLora<B>,
}

impl<B: Backend> DMoeLora<B> {
    /// Fresh adapters for a layer of `E` experts, width `D` and hidden width `F`; the three projections
    /// draw their `A` from seeds derived from `seed`.
    pub fn init(config: &LoraConfig, num_experts: usize, d_model: usize, d_ff: usize, seed: u64, device: &B::Device) -> Self {
        let sub = |i: u64| seed.wrapping_mul(3).wrapping_add(i);
        Self {
            w1: ExpertLora::init(config, num_experts, d_model, d_ff, sub(0), device),
            w3: ExpertLora::init(config, num_experts, d_model, d_ff, sub(1), device),
            w2: ExpertLora::init(config, num_experts, d_ff, d_model, sub(2), device),
        }
    }
}

/// Sets `require_grad = false` on every parameter of `module` (what LoRA does to the base weights).
/// Unlike Burn's `Module::no_grad`, which takes each value first, a lazy parameter (one that reads
/// its values from a checkpoint when first used) stays lazy: only its trainability changes.
pub fn freeze<B: Backend, M: Module<B>>(module: M) -> M {
    struct Freeze;
    impl<B: Backend> burn::module::ModuleMapper<B> for Freeze {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.set_require_grad(false)
        }
    }
    module.map(&mut Freeze)
}
