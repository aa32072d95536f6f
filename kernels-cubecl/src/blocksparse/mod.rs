//! MegaBlocks-style block-sparse kernels: the expert layer as an SDD (dense · denseᵀ sampled on a
//! block-sparse topology), a DSD (sparse · dense) and the DSᵀD weight gradient (sparseᵀ · dense over
//! the transposed topology). The topology and the plain-Rust references are in
//! [`reference::blocksparse`](crate::reference::blocksparse).

mod cmma;
mod kernel;
mod launch;

pub use crate::reference::blocksparse::{BlockSparseError, BlockSparseTopology};
pub use cmma::{CMMA_SPARSE_BLOCK, block_sparse_forward_cmma_kernel, block_sparse_weight_grad_cmma_kernel};
pub use kernel::{dsd_kernel, dstd_kernel, sdd_kernel};
pub use launch::{
    BLOCK_SPARSE_CMMA_DEFAULT, BLOCK_SPARSE_CMMA_WEIGHT_GRAD_DEFAULT, BlockSparseProblem, BlockSparseStrategy, TopologyBuffers,
    block_sparse_cmma_supported, launch_dsd, launch_dsd_with, launch_dstd, launch_dstd_with, launch_sdd, launch_sdd_with,
};
