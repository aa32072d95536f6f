//! Host-scalar reductions between ranks (loss parts, token counts). Gradient synchronisation lives
//! with the parallel plan in [`crate::sharding`]: ranks sum gradients whose losses were already
//! divided by the global number of target tokens, so the sum is exactly the single-device gradient
//! of the global batch.

use burn::tensor::Tensor;
use burn_moe_backend::dist::{CommError, Communicator, ReduceOp};

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
