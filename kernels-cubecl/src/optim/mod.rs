//! The AdamW update fused into one elementwise pass: parameter, gradient and both moments read once,
//! the new parameter and moments written once — instead of the dozen separate elementwise ops (each
//! a full pass over memory) that composing burn-optim's formula from tensor ops costs; gradient
//! clipping rides along as a factor on the gradient. And the gradient norm's sum of squares in one
//! read of the gradient (partial sums per cube), instead of a squared copy and a reduction.

mod kernel;
mod launch;

pub use kernel::{adamw_kernel, sum_squares_kernel};
pub use launch::{AdamWBuffers, AdamWHyper, adamw_vector_size, launch_adamw, launch_sum_squares, sum_squares_cubes};
