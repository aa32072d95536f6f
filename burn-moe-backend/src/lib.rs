//! # burn-moe-backend
//!
//! The Burn side of burn-moe's dropless mixture-of-experts (dMoE): an embeddable [`DMoe`] module
//! (router + stacked SwiGLU experts) whose expert computation is selected by [`MoeKernel`], the
//! load-balancing statistics it returns ([`MoeAuxStats`]), and the reference dropless implementation
//! built from standard Burn tensor ops, which runs on every backend and is the ground truth the CubeCL
//! kernels are tested against.
//!
//! This crate knows nothing about Mixtral: any Burn model can embed [`DMoe`]. It may depend on
//! `burn` and `kernels-cubecl`.

pub mod attention;
pub mod aux;
#[cfg(any(feature = "nccl", feature = "cublas"))]
mod cuda;
pub mod dispatch;
pub mod dist;
pub mod dmoe;
pub mod gemm;
pub mod kernel;
pub mod lora;
pub mod loss;
pub mod memory;
pub mod norm;
pub mod ops;
pub mod optim;
pub mod reference;

pub use attention::{CausalAttention, causal_attention};
pub use aux::{MoeAuxStats, load_balancing_loss};
pub use dispatch::{AllToAllDispatcher, LocalDispatcher, TokenDispatcher, experts_of_rank};
pub use dmoe::{DEFAULT_BLOCK_SIZE, DMoe, DMoeConfig, MoeOutput, RouterOutput, TokenMask};
pub use gemm::{GroupedGemm, GroupedGemmError, grouped_gemm, set_grouped_gemm};
pub use kernel::MoeKernel;
pub use memory::{DeviceMemory, MemoryBackend, persistent_params, persistent_sizes};
pub use lora::{DMoeLora, ExpertLora, LoraConfig, LoraConfigError, freeze};
pub use ops::MoeBackend;
pub use optim::{ComputeCopies, FusedAdamW, FusedAdamWOptimizer, GradScale};
