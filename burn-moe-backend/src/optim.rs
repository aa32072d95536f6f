//! AdamW with the whole update in one elementwise pass ([`MoeBackend::moe_adamw_step`]).
//!
//! burn-optim's `AdamW` composes its update from about a dozen tensor ops, each a full pass over
//! the parameter's memory (99 ms per step for the 3.1 G f32 master weights of a two-layer
//! Mixtral-shaped model on an H200, BENCHMARKS.md). [`FusedAdamW`] is the same algorithm — same
//! formula and order of operations, same state type ([`AdamWState`]), so checkpoints of either
//! load into the other — with the update delegated to the backend: one kernel on CubeCL backends,
//! burn-optim's tensor ops (bit for bit the same numbers as its `AdamW`) elsewhere. Gradient clipping
//! can ride along ([`GradScale`]): the factor multiplies each gradient inside the same pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use kernels_cubecl::optim::AdamWHyper;

use crate::MoeBackend;

/// A factor that every following update applies to each gradient before using it — gradient
/// clipping folded into the update pass (instead of a separate pass that rewrites every gradient).
/// Shared: the training loop sets it after computing the gradient norm; the optimizer it was given
/// to reads it in [`SimpleOptimizer::step`]. Starts at 1 (gradients as they are).
#[derive(Debug, Clone)]
pub struct GradScale(Arc<AtomicU32>);

impl GradScale {
    /// Sets the factor of the next updates.
    pub fn set(&self, factor: f32) {
        self.0.store(factor.to_bits(), Ordering::Relaxed);
    }

    /// The current factor.
    pub fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl Default for GradScale {
    fn default() -> Self {
        Self(Arc::new(AtomicU32::new(1.0f32.to_bits())))
    }
}

/// AdamW (decoupled weight decay, no AMSGrad), updated by one fused pass per parameter.
#[derive(Debug, Clone)]
pub struct FusedAdamW {
    /// β₁ (burn-optim's default 0.9).
    pub beta_1: f32,
    /// β₂ (default 0.999).
    pub beta_2: f32,
    /// ε (default 1e-5).
    pub epsilon: f32,
    /// Decoupled weight decay λ (default 1e-4).
    pub weight_decay: f32,
    /// Whether the backend's [`MoeBackend::moe_adamw_step`] runs (one kernel on CubeCL backends);
    /// `false` runs burn-optim's tensor ops ([`adamw_step_ops`]) on every backend.
    pub fused: bool,
    /// Factor on every gradient (gradient clipping; see [`GradScale`]).
    pub grad_scale: GradScale,
}

impl Default for FusedAdamW {
    /// burn-optim's `AdamWConfig` defaults, gradients unscaled.
    fn default() -> Self {
        Self { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-5, weight_decay: 1e-4, fused: true, grad_scale: GradScale::default() }
    }
}

impl FusedAdamW {
    /// The optimizer for module `M` (the adaptor applies [`step`](SimpleOptimizer::step) to each
    /// parameter with its gradient).
    pub fn init<B, M>(self) -> OptimizerAdaptor<Self, M, B>
    where
        B: AutodiffBackend,
        B::InnerBackend: MoeBackend,
        M: AutodiffModule<B>,
    {
        OptimizerAdaptor::from(self)
    }
}

impl<B: MoeBackend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        // The first step starts from zero moments (`0·β + g·(1−β)` is exactly burn-optim's
        // initialisation `g·(1−β)`).
        let (time, m, v) = match state {
            Some(s) => (s.momentum.time + 1, s.momentum.moment_1, s.momentum.moment_2),
            None => (1, grad.zeros_like(), grad.zeros_like()),
        };
        let hyper = AdamWHyper {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            lr: lr as f32,
            // burn-optim computes the decay factor in f64 (`1 − lr·λ`), then scales in the element type.
            keep: (1.0 - lr * f64::from(self.weight_decay)) as f32,
            time: i32::try_from(time).unwrap_or(i32::MAX),
            grad_scale: self.grad_scale.get(),
        };
        let prim = |t: Tensor<B, D>| t.into_primitive().tensor();
        let (p, m, v) = if self.fused {
            B::moe_adamw_step(prim(tensor), prim(grad), prim(m), prim(v), &hyper)
        } else {
            adamw_step_ops::<B>(prim(tensor), prim(grad), prim(m), prim(v), &hyper)
        };
        let wrap = |t| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(t));
        let momentum = AdaptiveMomentumState::new(time, wrap(m), wrap(v));
        (wrap(p), Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

/// One AdamW update from tensor ops, in burn-optim's order (its `AdamW` gives the same numbers):
/// the default of [`MoeBackend::moe_adamw_step`], and what [`FusedAdamW`] runs with `fused: false`.
pub fn adamw_step_ops<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    m: FloatTensor<B>,
    v: FloatTensor<B>,
    hyper: &AdamWHyper,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    use burn::tensor::TensorMetadata;
    let [b1, f1, b2, f2, c1, c2, eps, lr, keep, scale] = hyper.packed();
    // Elementwise: flattened to 1-d and back, whatever the parameter's rank.
    let shape = param.shape();
    let n = shape.num_elements();
    let flat = |t: FloatTensor<B>| float1::<B>(B::float_reshape(t, burn::tensor::Shape::new([n])));
    let (p, g, m, v) = (flat(param), flat(grad), flat(m), flat(v));
    // Clipping as a separate `g · factor` pass would round the same way (one f32 product).
    let g = if scale == 1.0 { g } else { g.mul_scalar(scale) };
    let m = m.mul_scalar(b1).add(g.clone().mul_scalar(f1));
    let v = v.mul_scalar(b2).add(g.square().mul_scalar(f2));
    let delta = m.clone().div_scalar(c1).div(v.clone().div_scalar(c2).sqrt().add_scalar(eps));
    let p = if keep == 1.0 { p } else { p.mul_scalar(keep) };
    let p = p - delta.mul_scalar(lr);
    let back = |t: Tensor<B, 1>| B::float_reshape(t.into_primitive().tensor(), shape.clone());
    (back(p), back(m), back(v))
}

fn float1<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `Σ x²` from tensor ops, in f32 (f64 for f64 tensors): the default of
/// [`MoeBackend::moe_sum_squares`]. Summed in rows of up to 4096 first: burn-cubecl reduces a whole
/// tensor to one value with a handful of cubes (4.5 ms for a Mixtral layer's 1.4 G expert gradients
/// on an H200), while a row-wise sum spreads over the whole GPU.
///
/// # Shapes
/// - `x`: any shape → `[1]`
pub fn sum_squares_ops<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    use burn::tensor::{DType, TensorMetadata};
    let n = x.shape().num_elements();
    let flat = float1::<B>(B::float_reshape(x, burn::tensor::Shape::new([n])));
    let flat = if matches!(flat.dtype(), DType::F32 | DType::F64) { flat } else { flat.cast(DType::F32) };
    let sq = flat.clone() * flat;
    let total = match [4096usize, 1024, 256, 64].into_iter().find(|&c| n > c && n.is_multiple_of(c)) {
        Some(c) => sq.reshape([n / c, c]).sum_dim(1).sum(),
        None => sq.sum(),
    };
    total.into_primitive().tensor()
}
