//! Distributed runtime: collectives over Burn tensors ([`Communicator`]), an in-process implementation
//! for CPU runs and tests, NCCL for CUDA (feature `nccl`), the device mesh and sharded parameters.

mod comm;
mod env;
#[cfg(feature = "nccl")]
mod nccl;

pub use comm::{CommError, Communicator, ReduceOp, check_splits};
pub use env::{DistEnv, rendezvous};
#[cfg(feature = "nccl")]
pub use nccl::{CudaTensorAccess, NcclComm, NcclConfig, local_cuda_device};
