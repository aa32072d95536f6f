//! ScatterMoE-style kernels: permute rows into expert order, grouped matmul over expert segments (and
//! its weight gradient), weighted combine back to tokens.

mod kernel;
mod launch;

pub use kernel::{combine_kernel, grouped_matmul_kernel, grouped_matmul_weight_grad_kernel, permute_kernel};
pub use launch::{GroupedMatmulProblem, KernelError, launch_combine, launch_grouped_matmul, launch_grouped_matmul_weight_grad, launch_permute};
