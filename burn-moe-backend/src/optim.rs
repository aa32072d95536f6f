//! AdamW with the whole update in one elementwise pass ([`MoeBackend::moe_adamw_step`]).
//!
//! burn-optim's `AdamW` composes its update from about a dozen tensor ops, each a full pass over
//! the parameter's memory (99 ms per step for the 3.1 G f32 master weights of a two-layer
//! Mixtral-shaped model on an H200, BENCHMARKS.md). [`FusedAdamW`] is the same algorithm — same
//! formula and order of operations, same state type ([`AdamWState`]), so checkpoints of either
//! load into the other — with the update delegated to the backend: one kernel on CubeCL backends,
//! burn-optim's tensor ops (bit for bit the same numbers as its `AdamW`) elsewhere.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use kernels_cubecl::optim::AdamWHyper;

use crate::MoeBackend;

/// AdamW (decoupled weight decay, no AMSGrad), updated by one fused pass per parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
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
}

impl Default for FusedAdamW {
    /// burn-optim's `AdamWConfig` defaults.
    fn default() -> Self {
        Self { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-5, weight_decay: 1e-4, fused: true }
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
    let [b1, f1, b2, f2, c1, c2, eps, lr, keep] = hyper.packed();
    // Elementwise: flattened to 1-d and back, whatever the parameter's rank.
    let shape = param.shape();
    let n = shape.num_elements();
    let flat = |t: FloatTensor<B>| float1::<B>(B::float_reshape(t, burn::tensor::Shape::new([n])));
    let (p, g, m, v) = (flat(param), flat(grad), flat(m), flat(v));
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
