//! Distributed runtime: collectives over Burn tensors ([`Communicator`]), an in-process implementation
//! for CPU runs and tests, NCCL for CUDA (feature `nccl`), the device mesh and sharded parameters.

mod comm;

pub use comm::{CommError, Communicator, ReduceOp, check_splits};
