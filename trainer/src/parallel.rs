//! Data parallelism applied from outside the model: gradient synchronisation over a
//! [`Communicator`] (DDP: every rank holds all parameters and averages nothing — it sums
//! gradients whose losses were already divided by the global number of target tokens, so the sum
//! is exactly the single-device gradient of the global batch).

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use burn_moe_backend::dist::{CommError, Communicator, ReduceOp};

/// Sums every parameter's gradient over `comm` in place (a missing gradient — a parameter that got
/// none on this rank, e.g. an expert that received no tokens — is treated as zero, so every rank
/// takes part in the same collectives in the same order).
pub fn all_reduce_grads<B, M, C>(model: &M, grads: &mut GradientsParams, comm: &C) -> Result<(), CommError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    C: Communicator<B::InnerBackend>,
{
    if comm.size() == 1 {
        return Ok(());
    }
    struct Sync<'a, C> {
        grads: &'a mut GradientsParams,
        comm: &'a C,
        error: Option<CommError>,
    }
    impl<B: AutodiffBackend, C: Communicator<B::InnerBackend>> ModuleVisitor<B> for Sync<'_, C> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.error.is_some() || !param.is_require_grad() {
                return;
            }
            let id: ParamId = param.id;
            let local = match self.grads.remove::<B::InnerBackend, D>(id) {
                Some(g) => g,
                None => {
                    let value = param.val();
                    Tensor::<B, D>::zeros(value.shape(), &value.device()).inner()
                }
            };
            match self.comm.all_reduce(local, ReduceOp::Sum) {
                Ok(g) => self.grads.register::<B::InnerBackend, D>(id, g),
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut sync = Sync { grads, comm, error: None };
    model.visit(&mut sync);
    match sync.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Sums host scalars (loss parts, token counts) over `comm`, in f64 on the host side.
pub fn all_reduce_scalars<B, C>(values: &[f64], comm: &C, device: &burn::tensor::Device<B>) -> Result<Vec<f64>, CommError>
where
    B: burn::tensor::backend::Backend,
    C: Communicator<B>,
{
    if comm.size() == 1 {
        return Ok(values.to_vec());
    }
    let t = Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(values.to_vec(), [values.len()]).convert::<f32>(), device);
    let t = t.cast(burn::tensor::DType::F32);
    let sum = comm.all_reduce(t, ReduceOp::Sum)?;
    Ok(sum.into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default())
}
