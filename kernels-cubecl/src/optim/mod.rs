//! The AdamW update fused into one elementwise pass: parameter, gradient and both moments read once,
//! the new parameter and moments written once — instead of the dozen separate elementwise ops (each
//! a full pass over memory) that composing burn-optim's formula from tensor ops costs.

mod kernel;
mod launch;

pub use kernel::adamw_kernel;
pub use launch::{AdamWHyper, launch_adamw};
