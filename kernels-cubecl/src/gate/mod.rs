//! The router's gate, `logits = x · gateᵀ` with a gate of `E` (a handful of) rows, and its weight
//! gradient `dgate = dlogitsᵀ · x`. Both are thin products (8 output columns for Mixtral) that a
//! tiled matmul runs on a few dozen cubes: on an H200 at T=4096, d=4096, E=8, Burn's bf16 matmul took
//! 176 µs (grid 8 × 4) for the logits and 206 µs for the gate gradient, where reading `x` once takes
//! ~10 µs. Here the logits get a cube per token (its `E` dot products reduced over the cube in one
//! pass) and the gradient a column kernel over row chunks plus a sum of the chunks, both reading `x`
//! once in 16-byte vectors, sums in f32.

mod kernel;
mod launch;

pub use kernel::{gate_logits_kernel, gate_weight_grad_finish_kernel, gate_weight_grad_kernel};
pub use launch::{GATE_MAX_EXPERTS, launch_gate_logits, launch_gate_weight_grad};

use crate::scatter::KernelError;

/// One gate product (no data): `tokens` rows of `dim` values against `experts` gate rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateProblem {
    /// Rows of `x` (and of the logits).
    pub tokens: usize,
    /// Values per row of `x` and of the gate.
    pub dim: usize,
    /// Rows of the gate (columns of the logits).
    pub experts: usize,
}

impl GateProblem {
    /// Checks that the kernels take the problem: `1..=GATE_MAX_EXPERTS` experts (each unit keeps a
    /// sum per expert in registers) and values to reduce.
    ///
    /// # Errors
    /// [`KernelError::Shape`] naming the numbers.
    pub fn check(&self) -> Result<(), KernelError> {
        if self.experts == 0 || self.experts > GATE_MAX_EXPERTS {
            return Err(KernelError::Shape(format!("gate of {} experts: the gate kernels take 1 to {GATE_MAX_EXPERTS}", self.experts)));
        }
        if self.tokens > 0 && self.dim == 0 {
            return Err(KernelError::Shape(format!("gate logits of {} tokens with 0 values each", self.tokens)));
        }
        Ok(())
    }
}
