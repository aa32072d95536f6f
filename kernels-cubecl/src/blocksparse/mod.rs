//! MegaBlocks-style block-sparse kernels: the expert layer as an SDD (dense · denseᵀ sampled on a
//! block-sparse topology), a DSD (sparse · dense) and the DSᵀD weight gradient (sparseᵀ · dense over
//! the transposed topology). The topology and the plain-Rust references are in
//! [`reference::blocksparse`](crate::reference::blocksparse).

mod kernel;
mod launch;

pub use crate::reference::blocksparse::{BlockSparseError, BlockSparseTopology};
pub use kernel::{dsd_kernel, dstd_kernel, sdd_kernel};
pub use launch::{BlockSparseProblem, TopologyBuffers, launch_dsd, launch_dstd, launch_sdd};
