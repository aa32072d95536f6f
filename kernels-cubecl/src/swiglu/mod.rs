//! Fused SwiGLU activation of the expert layers, `h = silu(gate) · up`, and its backward, one pass over
//! the `[rows, ffn]` activations each instead of the separate elementwise ops (and f32 round trips)
//! that composing it from tensor ops costs.

mod kernel;
mod launch;

pub use kernel::{swiglu_backward_kernel, swiglu_kernel};
pub use launch::{launch_swiglu, launch_swiglu_backward, swiglu_vector_size};
