//! Cross-entropy over a vocabulary, fused: one cube per row computes the row's log-sum-exp and the
//! target's negative log-likelihood in two sweeps of the logits (f32 math whatever the storage), and
//! the backward pass forms `dlogits = dnll · (softmax − onehot)` in one more. Composed from tensor
//! ops (an f32 copy of the logits, maximum, subtraction, exponential, sum, logarithm, gather, and
//! as many passes back) the loss over `[4096, 32000]` logits cost ~6–8 ms of an H200 step.

mod kernel;
mod launch;

pub use kernel::{cross_entropy_backward_kernel, cross_entropy_kernel};
pub use launch::{launch_cross_entropy, launch_cross_entropy_backward};

use crate::scatter::KernelError;

/// One cross-entropy problem (no data): `rows` rows of `vocab` logits, contiguous, one target index
/// per row. A row whose target is outside `0..vocab` (the ignore index −100 is) contributes nothing:
/// zero loss, zero gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossEntropyProblem {
    /// Rows (tokens).
    pub rows: usize,
    /// Logits per row (the vocabulary).
    pub vocab: usize,
}

impl CrossEntropyProblem {
    /// Checks that rows have logits.
    ///
    /// # Errors
    /// [`KernelError::Shape`] naming the numbers.
    pub fn check(&self) -> Result<(), KernelError> {
        if self.rows > 0 && self.vocab == 0 {
            return Err(KernelError::Shape(format!("cross-entropy of {} rows over an empty vocabulary", self.rows)));
        }
        Ok(())
    }
}
