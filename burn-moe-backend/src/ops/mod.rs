//! The MoE backend extension: the differentiable ops that the dropless-MoE kernel families are built
//! from (ScatterMoE: permute, grouped matmul, combine; MegaBlocks: block-sparse SDD, DSD, DSᵀD), with
//! default implementations from standard Burn ops (any backend) and adjoint backward passes for
//! `Autodiff`.

mod autodiff;
mod backend;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cublas")]
mod cublas;
#[cfg(feature = "cube")]
mod fusion;
mod impls;
mod reference;
mod scatter_add;

pub use backend::{
    AdamWUpdate, HostIndex, MoeBackend, moe_combine, moe_combine_host, moe_cross_entropy, moe_dsd, moe_dstd, moe_gate_logits, moe_grouped_matmul, moe_linear, moe_permute, moe_permute_host, moe_rms_norm,
    moe_sdd, moe_sum_squares, moe_swiglu, uses_grouped_gemm,
};
#[cfg(feature = "cublas")]
pub(crate) use cublas::cublas_available;
#[cfg(feature = "cube")]
pub use fusion::fused_moe_op_count;
pub use kernels_cubecl::BlockSparseTopology;
pub use reference::{
    reference_combine, reference_combine_backward, reference_dsd, reference_dstd, reference_gate_logits, reference_gate_weight_grad, reference_grouped_matmul,
    reference_grouped_matmul_weight_grad, reference_sdd,
};
