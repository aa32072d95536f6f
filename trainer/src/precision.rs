//! Mixed precision (`--dtype bf16|f16`): the optimizer keeps f32 master weights and f32 AdamW
//! moments; every step computes with a copy of the weights rounded to the compute dtype, and the
//! gradients (produced in that dtype) are widened to f32 before they are accumulated, reduced,
//! clipped and applied — the recipe of `torch.autocast` + f32 master weights, made explicit.
//!
//! With the fused AdamW the widening and the copy ride in the optimizer's pass where they can: it
//! reads bf16 gradients that nothing sums first ([`widen_grads_where`]) and leaves the next step's
//! copy of each weight in [`ComputeCopies`] ([`compute_copy`] takes it).
//!
//! Frozen weights (the base model under LoRA) have no master copy: they are stored in the compute
//! dtype from the start (as transformers loads a `torch_dtype=bfloat16` base), which halves their
//! memory. The model code follows each tensor's runtime dtype and does its softmaxes, norms and
//! loss in f32 (as HF does), so the device's default float dtype is never changed: host scalars,
//! statistics and gradient buffers stay f32.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn_moe_backend::ComputeCopies;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor};

/// Compute precision of a run (`--dtype`, alias `--torch-dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// Everything in f32.
    #[default]
    #[value(alias = "float32")]
    F32,
    /// bf16 compute, f32 master weights and optimizer state.
    #[value(alias = "bfloat16")]
    Bf16,
    /// f16 compute, f32 master weights and optimizer state (no loss scaling: meant for kernel and
    /// CPU (wgpu) testing; train real models in bf16).
    #[value(alias = "float16")]
    F16,
}

impl Dtype {
    /// The compute dtype, `None` for plain f32 (no copies, no casts).
    #[must_use]
    pub fn compute(self) -> Option<FloatDType> {
        match self {
            Self::F32 => None,
            Self::Bf16 => Some(FloatDType::BF16),
            Self::F16 => Some(FloatDType::F16),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// Whether `B` can compute in `dtype` on `device`; the message names the backend's limit.
///
/// # Errors
/// A sentence for the user when the backend has no such tensors (burn-ndarray has neither bf16
/// nor f16).
pub fn check_support<B: Backend>(dtype: Dtype, device: &B::Device) -> Result<(), String> {
    let Some(compute) = dtype.compute() else { return Ok(()) };
    if B::supports_dtype(device, DType::from(compute)) {
        Ok(())
    } else {
        Err(format!(
            "--dtype {dtype}: the {} backend has no {dtype} tensors on {device:?}; use --device cuda (or --dtype f32)",
            B::name(device)
        ))
    }
}

/// `t.cast(dtype)`, except that a tensor without elements is recreated instead of converted: CUDA
/// rejects a kernel launch over nothing (`CUDA_ERROR_INVALID_VALUE`), and FSDP1 ranks hold empty
/// pieces of the parameters outside their chunk.
pub fn cast<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    if t.shape().num_elements() == 0 && t.dtype() != DType::from(dtype) {
        Tensor::empty(t.shape(), (&t.device(), DType::from(dtype)))
    } else {
        t.cast(dtype)
    }
}

/// Stores the frozen parameters in the compute dtype (trainable ones stay f32 masters).
pub fn freeze_in<B: AutodiffBackend, M: Module<B>>(model: M, compute: FloatDType) -> M {
    struct Frozen(FloatDType);
    impl<B: AutodiffBackend> ModuleMapper<B> for Frozen {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let compute = self.0;
            let store = move |t: Tensor<B, D>| if t.is_require_grad() { t } else { Tensor::from_inner(cast(t.inner(), compute)) };
            if !param.is_initialized() {
                // A lazily loaded checkpoint: the cast joins its initialisation, so the weight is
                // still read only once, and only the piece the sharding plan asks for.
                return param.init_mapper(store);
            }
            if param.is_require_grad() {
                return param;
            }
            let (id, t, mapper) = param.consume();
            Param::from_mapped_value(id, store(t), mapper)
        }
    }
    model.map(&mut Frozen(compute))
}

/// `value` as a fresh autodiff leaf, tracked when `trainable`.
fn leaf<B: AutodiffBackend, const D: usize>(value: Tensor<B::InnerBackend, D>, trainable: bool) -> Tensor<B, D> {
    let t = Tensor::<B, D>::from_inner(value);
    if trainable { t.require_grad() } else { t }
}

/// The model the forward pass runs: every parameter rounded to the compute dtype as a fresh
/// autodiff leaf, so the backward pass stops at the copy and its gradient is keyed by the
/// parameter's id ([`compute_value`]) — taken from `copies` where the optimizer's last update left
/// the parameter already rounded (one pass over the weights fewer per step), cast otherwise.
pub fn compute_copy<B: AutodiffBackend, M: Module<B>>(model: M, compute: FloatDType, copies: Option<&ComputeCopies<B::InnerBackend>>) -> M {
    struct Round<'a, B: Backend>(FloatDType, Option<&'a ComputeCopies<B>>);
    impl<B: AutodiffBackend> ModuleMapper<B> for Round<'_, B::InnerBackend> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, t, mapper) = param.consume();
            Param::from_mapped_value(id, compute_value(id, t, self.0, self.1, true), mapper)
        }
    }
    model.map(&mut Round(compute, copies))
}

/// Parameter `id`'s value `t` in the compute dtype as a forward pass takes it: the optimizer's
/// copy where its last update left one (`copies`), else cast; a fresh autodiff leaf (tracked when
/// trainable) when `track`, else untracked (a pass that keeps no graph).
pub fn compute_value<B: AutodiffBackend, const D: usize>(
    id: ParamId,
    t: Tensor<B, D>,
    compute: FloatDType,
    copies: Option<&ComputeCopies<B::InnerBackend>>,
    track: bool,
) -> Tensor<B, D> {
    let trainable = t.is_require_grad() && track;
    let ready = copies.filter(|c| c.dtype() == compute).and_then(|c| c.get::<D>(id, &t.shape()));
    match ready {
        Some(copy) => leaf(copy, trainable),
        None => leaf(cast(t.inner(), compute), trainable),
    }
}

/// Widens the gradients of `module`'s parameters for which `wide(id)` holds to f32 (the masters'
/// dtype), in place. The others stay in the compute dtype: the optimizer's update reads them as they
/// are (one pass over the gradients fewer), which is exact as long as nothing sums them first — no
/// accumulation over micro-batches and no reduction over ranks.
pub fn widen_grads_where<B: AutodiffBackend, M: Module<B>>(module: &M, grads: &mut GradientsParams, wide: impl Fn(ParamId) -> bool) {
    struct Widen<'a, W>(&'a mut GradientsParams, W);
    impl<B: AutodiffBackend, W: Fn(ParamId) -> bool> ModuleVisitor<B> for Widen<'_, W> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !(self.1)(param.id) {
                return;
            }
            if let Some(g) = self.0.remove::<B::InnerBackend, D>(param.id) {
                self.0.register::<B::InnerBackend, D>(param.id, cast(g, FloatDType::F32));
            }
        }
    }
    module.visit(&mut Widen(grads, wide));
}

/// Widens the gradients of `module`'s parameters to f32 (the masters' dtype), in place.
pub fn widen_grads<B: AutodiffBackend, M: Module<B>>(module: &M, grads: &mut GradientsParams) {
    widen_grads_where(module, grads, |_| true);
}
