//! The softmax of blocked causal attention, fused: a block of query rows' scores (`q·kᵀ` of the keys
//! the block can see) becomes probabilities and per-row log-sum-exps in one kernel — scale, causal
//! and sliding-window mask, maximum, exponentials, sum and division, which composed from tensor ops
//! are about ten passes over the block — and the backward pass rebuilds the probabilities from the
//! log-sum-exps and forms the score gradients in one more.

mod kernel;
mod launch;

pub use kernel::{SOFTMAX_UNITS, attention_softmax_backward_kernel, attention_softmax_kernel};
pub use launch::{launch_attention_softmax, launch_attention_softmax_backward};

use crate::scatter::KernelError;

/// One block of causal-attention score rows (no data): `rows` rows of `keys` scores, contiguous;
/// row `r` holds query `first_query + r % queries` against keys `first_key ..first_key + keys`
/// (rows of several heads follow each other, `queries` rows per head). The query sees key `j` iff
/// `j ≤ query` and, with a window `w`, `query − w < j`; scores are multiplied by `scale` first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftmaxBlock {
    /// Rows of the block.
    pub rows: usize,
    /// Scores per row.
    pub keys: usize,
    /// Consecutive rows that are consecutive queries (the block's queries per head).
    pub queries: usize,
    /// Position of the first row's query.
    pub first_query: usize,
    /// Position of the first column's key.
    pub first_key: usize,
    /// Multiplier of the scores (f64 so that tensor-op implementations in f64 keep it exactly; the
    /// kernels multiply in f32).
    pub scale: f64,
    /// Sliding window, if any.
    pub window: Option<usize>,
}

impl SoftmaxBlock {
    /// Whether a row's query sees a column's key.
    pub fn visible(&self, row: usize, col: usize) -> bool {
        let (query, key) = (self.first_query + row % self.queries.max(1), self.first_key + col);
        key <= query && self.window.is_none_or(|w| query < key + w)
    }

    /// Checks that every row sees at least one key (its own), so no softmax is over nothing: the
    /// keys start at or before the first query and reach the last, the window (if any) is positive,
    /// and the rows are whole heads of queries.
    ///
    /// # Errors
    /// [`KernelError::Shape`] naming the numbers.
    pub fn check(&self) -> Result<(), KernelError> {
        let bad = |why: String| Err(KernelError::Shape(format!("attention softmax block {self:?}: {why}")));
        if self.rows == 0 {
            return Ok(());
        }
        if self.queries == 0 || !self.rows.is_multiple_of(self.queries) {
            return bad(format!("{} rows are not whole heads of {} queries", self.rows, self.queries));
        }
        if self.first_key > self.first_query || self.first_key + self.keys < self.first_query + self.queries {
            return bad("the keys must start at or before the first query and reach the last".into());
        }
        if self.window == Some(0) {
            return bad("a window must be positive".into());
        }
        // With the keys covering every query, each row sees at least its own key, whatever the window.
        Ok(())
    }
}
