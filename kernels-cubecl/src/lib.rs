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
//! exact metadata (histogram, stable expert sort, offsets, padded blocks), and the ScatterMoE kernel
//! family ([`scatter`]): permute, grouped matmul over expert segments and its weight gradient,
//! weighted combine, each accumulating in f32 for f32/f16/bf16 storage.

pub mod reference;
pub mod scatter;

pub use reference::routing::{RoutingError, RoutingPlan};
