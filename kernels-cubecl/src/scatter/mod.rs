//! ScatterMoE-style kernels: permute rows into expert order, grouped matmul over expert segments (and
//! its weight gradient), weighted combine back to tokens.

pub(crate) mod gemm;
pub(crate) mod gemm_pipelined;
mod gemm_wgrad;
mod kernel;
pub(crate) mod launch;
#[cfg(feature = "cuda")]
mod wgmma;
#[cfg(any(feature = "cuda", test))]
mod wgmma_source;

pub use kernel::{combine_backward_kernel, combine_kernel, grouped_matmul_kernel, grouped_matmul_weight_grad_kernel, permute_kernel};
pub use gemm::{
    CMMA_BLOCK_K, CMMA_BLOCK_M, CMMA_BLOCK_N, TILED_BLOCK_K, TILED_BLOCK_M, TILED_BLOCK_N, grouped_matmul_cmma_kernel,
    grouped_matmul_tiled_kernel,
};
pub use gemm_pipelined::{grouped_matmul_cmma_pipelined_kernel, grouped_matmul_weight_grad_cmma_pipelined_kernel};
pub use gemm_wgrad::{grouped_matmul_weight_grad_cmma_kernel, grouped_matmul_weight_grad_tiled_kernel};
pub use launch::{
    CMMA_PIPELINED_DEFAULT, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT, GroupedMatmulProblem, GroupedMatmulStrategy, KernelError, cmma_pipelined_manual_supported, cmma_pipelined_supported, cmma_supported, launch_combine, launch_combine_backward, launch_grouped_matmul,
    launch_grouped_matmul_weight_grad, launch_grouped_matmul_weight_grad_with, launch_grouped_matmul_with, launch_permute, pipelined_defaults, set_pipelined_defaults, set_tile_group, set_wgmma_enabled, tile_group, wgmma_enabled, wgmma_supported, TILE_GROUP_DEFAULT,
};
