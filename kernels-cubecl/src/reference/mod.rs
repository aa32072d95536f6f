//! Plain-Rust references for the MoE kernels.

pub mod routing;
pub mod scatter;
