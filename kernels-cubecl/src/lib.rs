//! # kernels-cubecl
//!
//! The dropless-MoE compute kernels of burn-moe, written against CubeCL only (no Burn types), so that
//! kernel authors can test them on any CubeCL runtime (CUDA on the GPU, wgpu over Mesa lavapipe in CI).
//!
//! Layout of the crate, following CubeK: each kernel family has a data-free *problem* struct, the
//! `#[cube]` kernel, a `launch` function returning `Result`, and a plain-Rust *reference* that the
//! tests compare against. This crate may depend on `cubecl` and std only; `burn-moe-backend` wraps it
//! into Burn ops.
//!
//! What is here today: the plain-Rust routing references ([`reference::routing`]) that define the
//! exact metadata (histogram, stable expert sort, offsets, padded blocks), the device-side routing
//! kernels ([`routing`]) that compute the same metadata bit for bit from expert indices on the
//! device (histogram, offsets, stable sort and its inverse, padded offsets and block experts, with
//! scans in shared memory instead of atomics), and the ScatterMoE kernel
//! family ([`scatter`]): permute, grouped matmul over expert segments and its weight gradient,
//! weighted combine and its fused backward (both gradients in one pass when the slots are a
//! permutation), each accumulating in f32 for f32/f16/bf16 storage. The grouped matmul and its
//! weight gradient have a shared-memory tiled kernel (any float), a single-stage tensor-core (`cmma`)
//! kernel for f16/bf16, and a pipelined tensor-core kernel whose operand tiles arrive by asynchronous
//! copies several depth steps ahead (`cp.async` + barriers, CUDA); `Auto` picks the most capable one
//! the runtime supports (see [`scatter::GroupedMatmulStrategy`]). On a Hopper GPU (sm_90) that is a
//! `wgmma` + TMA kernel written as generated CUDA source and compiled and launched by CubeCL's own CUDA
//! runtime (CubeCL 0.10's kernel language cannot emit `wgmma`): `scatter/wgmma_source.rs`,
//! `scatter/wgmma.rs`, feature `cuda`; `BURN_MOE_WGMMA=0` or [`scatter::set_wgmma_enabled`] keeps the
//! portable kernels.
//!
//! The router's gate ([`gate`]): the logits `x · gateᵀ` a cube per token, the gate's gradient by
//! column over row chunks — thin products that tiled matmuls spread over too few cubes.
//!
//! RMSNorm ([`rmsnorm`]): the forward pass and the input gradient one cube per row, the weight gradient
//! by column in row chunks. The language-model loss ([`xent`]): cross-entropy over the vocabulary, a
//! cube per row forward, a unit per logit backward.
//!
//! The causal-attention softmax ([`attention`]): a block of query rows' scores becomes probabilities
//! and per-row log-sum-exps in one kernel (scale, causal and sliding-window mask, softmax), and the
//! backward pass rebuilds the probabilities and forms the score gradients in one more.
//!
//! The MegaBlocks block-sparse family ([`blocksparse`]): sorted tokens are padded per expert to a
//! multiple of the block size `bs`, and the expert layer becomes two block-sparse matrix products
//! whose topology ([`BlockSparseTopology`], block-CSR plus its transpose) is built from the routing
//! counts: an SDD (`X_padded · W1catᵀ`, only the blocks where a row's expert meets its own columns),
//! a DSD (`H · W2cat`), and for the weight gradients a DSᵀD (`Hᵀ · D` over the transposed topology).
//! A hidden width `F` that is not a multiple of `bs` is padded to `Fp` in the sparse layout only: the
//! padded columns read no weight, are computed as zero and receive no gradient. At block size 128
//! with f16/bf16 on CUDA the three products run on the pipelined tensor-core grouped GEMMs of the
//! scatter family (one operand, or the output, in block storage); elsewhere on one-element kernels.

pub mod attention;
pub mod blocksparse;
pub mod gate;
pub mod optim;
mod reduce;
pub mod reference;
pub mod rmsnorm;
pub mod routing;
pub mod scatter;
pub mod swiglu;
pub mod xent;

pub use attention::SoftmaxBlock;
pub use gate::GateProblem;
pub use rmsnorm::RmsNormProblem;
pub use xent::CrossEntropyProblem;
pub use reference::blocksparse::{BlockSparseError, BlockSparseTopology};
pub use reference::routing::{RoutingError, RoutingPlan};
