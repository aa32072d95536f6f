//! Distributed runtime: collectives over Burn tensors ([`Communicator`]), an in-process implementation
//! for CPU runs and tests ([`ThreadComm`]), NCCL for CUDA (feature `nccl`), the device mesh
//! ([`DeviceMesh`]) and sharded tensors ([`DTensor`]).

mod comm;
mod dtensor;
mod host;
mod mesh;
mod thread;

pub use comm::{CommError, Communicator, ReduceOp, check_splits};
pub use dtensor::{DTensor, DTensorError, GroupInfo, Placement, reduce_scatter_shard, shard_range};
pub use host::reduce_host;
pub use mesh::{DeviceMesh, MeshError, validate_mesh};
pub use thread::{CommConfig, RankError, ThreadComm};
