//! Distributed runtime: collectives over Burn tensors ([`Communicator`]), an in-process implementation
//! for CPU runs and tests ([`ThreadComm`]), NCCL for CUDA (feature `nccl`, [`NcclComm`]), the
//! torchrun-style environment and rendezvous ([`DistEnv`]), the device mesh ([`DeviceMesh`]) and
//! sharded tensors ([`DTensor`]), and collectives inside the autodiff graph ([`GraphComm`],
//! [`CollectiveBackend`]) for expert parallelism.

mod comm;
mod dtensor;
mod env;
mod graph;
mod host;
mod mesh;
#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "cube")]
mod pool;
mod thread;

pub use comm::{CommError, Communicator, ReduceOp, check_splits};
pub use dtensor::{DTensor, DTensorError, GroupInfo, Placement, owned_copy, reduce_scatter_shard, reduce_scatter_shard_padded, shard_range, trim_reduced_shard};
pub use env::{DistEnv, rendezvous};
pub use graph::{CollectiveBackend, GraphComm, all_to_all_rows};
pub use host::reduce_host;
pub use mesh::{DeviceMesh, MeshError, validate_mesh};
#[cfg(feature = "cube")]
pub use pool::OutputPool;
#[cfg(feature = "nccl")]
pub use nccl::{CallProfile, CudaTensorAccess, NcclComm, NcclConfig, WaitMode, local_cuda_device};
pub use thread::{CommConfig, RankError, ThreadComm};
