//! The MoE backend extension: three differentiable ops that every dropless-MoE kernel family is built
//! from, with default implementations from standard Burn ops (any backend) and adjoint backward passes
//! for `Autodiff`.

mod autodiff;
mod backend;
#[cfg(feature = "cube")]
mod cube;
mod impls;
mod reference;

pub use backend::{MoeBackend, moe_combine, moe_grouped_matmul, moe_permute};
pub use reference::{reference_combine, reference_grouped_matmul, reference_grouped_matmul_weight_grad};
