//! Plain-Rust references for the MoE kernels.

pub mod attention;
pub mod blocksparse;
pub mod gate;
pub mod rmsnorm;
pub mod routing;
pub mod scatter;
pub mod swiglu;
pub mod xent;
