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

/// The routed pairs per expert summed over layers and ranks, followed by the number of rows the
/// routing statistics ran over (likewise summed): `[C_0, …, C_{E−1}, N]`, the constants of the
/// load-balancing loss of the global batch. `counts` holds this rank's per-layer counts (each `E`
/// long), `rows` its rows summed over layers.
///
/// # Errors
/// A failed all-reduce.
pub fn global_expert_counts<B, C>(
    counts: &[Vec<f64>],
    rows: usize,
    num_experts: usize,
    comm: &C,
    device: &burn::tensor::Device<B>,
) -> Result<Vec<f64>, CommError>
where
    B: burn::tensor::backend::Backend,
    C: Communicator<B>,
{
    let mut local = vec![0.0f64; num_experts + 1];
    for layer in counts {
        for (acc, c) in local.iter_mut().zip(layer) {
            *acc += c;
        }
    }
    local[num_experts] = rows as f64;
    all_reduce_scalars(&local, comm, device)
}
