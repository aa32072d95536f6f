//! AdamW with the whole update in one elementwise pass ([`MoeBackend::moe_adamw_step`]).
//!
//! burn-optim's `AdamW` composes its update from about a dozen tensor ops, each a full pass over
//! the parameter's memory (99 ms per step for the 3.1 G f32 master weights of a two-layer
//! Mixtral-shaped model on an H200, BENCHMARKS.md). [`FusedAdamW`] is the same algorithm — same
//! formula and order of operations, same state type ([`AdamWState`]), so checkpoints of either
//! load into the other — with the update delegated to the backend: one kernel on CubeCL backends,
//! burn-optim's tensor ops (bit for bit the same numbers as its `AdamW`) elsewhere. Gradient clipping
//! can ride along ([`GradScale`]): the factor multiplies each gradient inside the same pass.
//!
//! Mixed precision rides along too: the update takes a gradient narrower than the f32 master weight
//! (bf16 straight from the backward pass, widened in registers) and can leave the new weight rounded
//! to the compute dtype in [`ComputeCopies`], which the next step's forward pass takes instead of
//! casting every master again. On an H200 step of the two-layer model that is three passes over
//! the weights fewer (the widening, the copy, and half of the gradient norm's read).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, MultiGradientsParams, Optimizer, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, Shape, Tensor, TensorMetadata, TensorPrimitive};
use hashbrown::HashMap;
use kernels_cubecl::optim::AdamWHyper;

use crate::MoeBackend;
use crate::ops::AdamWUpdate;

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
    /// The optimizer for module `M` (applies [`step`](SimpleOptimizer::step)'s update to each
    /// parameter with its gradient; the record is burn-optim's `OptimizerAdaptor` record, so
    /// checkpoints of either load into the other).
    pub fn init<B, M>(self) -> FusedAdamWOptimizer<M, B>
    where
        B: AutodiffBackend,
        B::InnerBackend: MoeBackend,
        M: AutodiffModule<B>,
    {
        FusedAdamWOptimizer { optim: self, records: HashMap::new(), copies: None, module: PhantomData }
    }

    /// [`init`](Self::init) that also leaves each updated parameter rounded to `copies`' dtype in
    /// `copies` (mixed precision's compute copy of the next step).
    pub fn init_with_copies<B, M>(self, copies: ComputeCopies<B::InnerBackend>) -> FusedAdamWOptimizer<M, B>
    where
        B: AutodiffBackend,
        B::InnerBackend: MoeBackend,
        M: AutodiffModule<B>,
    {
        FusedAdamWOptimizer { optim: self, records: HashMap::new(), copies: Some(copies), module: PhantomData }
    }

    /// One update of `tensor` with `grad` (of the tensor's dtype or narrower) from `state`, and
    /// the new value in `copy`'s dtype when asked.
    fn update<B: MoeBackend, const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<AdamWState<B, D>>,
        copy: Option<FloatDType>,
    ) -> (Tensor<B, D>, AdamWState<B, D>, Option<Tensor<B, D>>) {
        // The first step starts from zero moments (`0·β + g·(1−β)` is exactly burn-optim's
        // initialisation `g·(1−β)`), in the parameter's dtype.
        let (time, m, v) = match state {
            Some(s) => (s.momentum.time + 1, s.momentum.moment_1, s.momentum.moment_2),
            None => (1, tensor.zeros_like(), tensor.zeros_like()),
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
        let out = if self.fused {
            B::moe_adamw_step(prim(tensor), prim(grad), prim(m), prim(v), &hyper, copy)
        } else {
            adamw_update_ops::<B>(prim(tensor), prim(grad), prim(m), prim(v), &hyper, copy)
        };
        let wrap = |t| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(t));
        let momentum = AdaptiveMomentumState::new(time, wrap(out.m), wrap(out.v));
        (wrap(out.param), AdamWState::new(momentum), out.copy.map(wrap))
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
        let (tensor, state, _) = self.update(lr, tensor, grad, state, None);
        (tensor, Some(state))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

/// Parameters rounded to a compute dtype by the optimizer's update pass, keyed by parameter, for
/// the next forward pass to use ([`get`](Self::get)) instead of casting the master weight again.
/// Shared (cheap to clone): the optimizer fills it, the training loop's compute copy reads it. Each
/// step of a [`FusedAdamWOptimizer`] given it first drops what the last step left, so a copy is
/// always of the current master. The copies are held from one update to the next, through the forward
/// and backward passes that use the same buffers: no memory beyond the compute copy a step makes anyway.
#[derive(Clone)]
pub struct ComputeCopies<B: Backend> {
    dtype: FloatDType,
    map: Arc<Mutex<HashMap<ParamId, FloatTensor<B>>>>,
}

impl<B: Backend> ComputeCopies<B> {
    /// An empty set of copies in `dtype`.
    pub fn new(dtype: FloatDType) -> Self {
        Self { dtype, map: Arc::default() }
    }

    /// The dtype of the copies.
    pub fn dtype(&self) -> FloatDType {
        self.dtype
    }

    /// Parameter `id`'s copy, if the last update left one of that shape (the tensor shares the stored
    /// buffer; the copy stays until the next update replaces it).
    pub fn get<const D: usize>(&self, id: ParamId, shape: &Shape) -> Option<Tensor<B, D>> {
        let t = self.lock().get(&id)?.clone();
        (t.shape() == *shape).then(|| Tensor::from_primitive(TensorPrimitive::Float(t)))
    }

    /// Number of copies held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no copy is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every copy.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn insert(&self, id: ParamId, t: FloatTensor<B>) {
        self.lock().insert(id, t);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ParamId, FloatTensor<B>>> {
        // A panic while holding the lock leaves the map itself intact.
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<B: Backend> std::fmt::Debug for ComputeCopies<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeCopies").field("dtype", &self.dtype).field("len", &self.len()).finish()
    }
}

/// [`FusedAdamW`] as an [`Optimizer`] of module `M`: each parameter with a gradient is updated by
/// one pass ([`MoeBackend::moe_adamw_step`]); with [`ComputeCopies`] the pass also writes the new
/// weight in the compute dtype. Its record is burn-optim's `OptimizerAdaptor` record of
/// [`FusedAdamW`] (the AdamW moments and step count per parameter id).
#[derive(Clone)]
pub struct FusedAdamWOptimizer<M, B>
where
    B: AutodiffBackend,
    B::InnerBackend: MoeBackend,
{
    optim: FusedAdamW,
    records: HashMap<ParamId, AdaptorRecord<FusedAdamW, B>>,
    copies: Option<ComputeCopies<B::InnerBackend>>,
    module: PhantomData<M>,
}

impl<M, B> FusedAdamWOptimizer<M, B>
where
    B: AutodiffBackend,
    B::InnerBackend: MoeBackend,
{
    /// The update's settings.
    pub fn optim(&self) -> &FusedAdamW {
        &self.optim
    }

    fn step_with(&mut self, lr: LearningRate, module: M, grads: StepGrads) -> M
    where
        M: AutodiffModule<B>,
    {
        if let Some(c) = &self.copies {
            c.clear();
        }
        let mut mapper = UpdateMapper { optim: &self.optim, records: &mut self.records, copies: self.copies.as_ref(), grads, lr };
        module.map(&mut mapper)
    }
}

impl<M, B> Optimizer<M, B> for FusedAdamWOptimizer<M, B>
where
    B: AutodiffBackend,
    B::InnerBackend: MoeBackend,
    M: AutodiffModule<B>,
{
    type Record = HashMap<ParamId, AdaptorRecord<FusedAdamW, B>>;

    fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        self.step_with(lr, module, StepGrads::Single(grads))
    }

    fn step_multi(&mut self, lr: LearningRate, module: M, grads: MultiGradientsParams) -> M {
        self.step_with(lr, module, StepGrads::Multi(grads))
    }

    fn to_record(&self) -> Self::Record {
        self.records.clone()
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.records = record;
        self
    }
}

/// The gradients of one step, from one device or several (summed on the parameter's device).
enum StepGrads {
    Single(GradientsParams),
    Multi(MultiGradientsParams),
}

impl StepGrads {
    fn remove<B: Backend, const D: usize>(&mut self, id: ParamId) -> Option<Tensor<B, D>> {
        match self {
            Self::Single(g) => g.remove(id),
            Self::Multi(g) => g.remove(id).map(|(t, _)| t),
        }
    }
}

struct UpdateMapper<'a, B: AutodiffBackend>
where
    B::InnerBackend: MoeBackend,
{
    optim: &'a FusedAdamW,
    records: &'a mut HashMap<ParamId, AdaptorRecord<FusedAdamW, B>>,
    copies: Option<&'a ComputeCopies<B::InnerBackend>>,
    grads: StepGrads,
    lr: LearningRate,
}

impl<B: AutodiffBackend> ModuleMapper<B> for UpdateMapper<'_, B>
where
    B::InnerBackend: MoeBackend,
{
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let trainable = tensor.is_require_grad();
        let device = grad.device();
        let tensor = tensor.inner();
        // A parameter follows its gradient's device (as burn-optim's adaptor does).
        let tensor = if tensor.device() == device { tensor } else { tensor.to_device(&device) };
        let state = self.records.remove(&id).map(|r| FusedAdamW::to_device(r.into_state::<D>(), &device));
        let copy = self.copies.map(ComputeCopies::dtype);
        let (tensor, state, copy) = self.optim.update(self.lr, tensor, grad, state, copy);
        self.records.insert(id, AdaptorRecord::from_state(state));
        if let (Some(copies), Some(c)) = (self.copies, copy) {
            copies.insert(id, c.into_primitive().tensor());
        }
        let tensor = Tensor::from_inner(tensor);
        Param::from_mapped_value(id, if trainable { tensor.require_grad() } else { tensor }, mapper)
    }
}

/// [`MoeBackend::moe_adamw_step`]'s default: the gradient cast to the parameter's dtype when it
/// differs, [`adamw_step_ops`], and the copy cast from the new parameter — exactly what widening the
/// gradients and casting the weights as separate passes computes.
pub fn adamw_update_ops<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    m: FloatTensor<B>,
    v: FloatTensor<B>,
    hyper: &AdamWHyper,
    copy: Option<FloatDType>,
) -> AdamWUpdate<B> {
    let grad = if grad.dtype() == param.dtype() { grad } else { B::float_cast(grad, FloatDType::from(param.dtype())) };
    let (param, m, v) = adamw_step_ops::<B>(param, grad, m, v, hyper);
    let copy = copy.map(|dtype| B::float_cast(param.clone(), dtype));
    AdamWUpdate { param, m, v, copy }
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
