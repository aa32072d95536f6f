//! Routing metadata for dropless MoE, computed on the host.
//!
//! A router assigns each of `T` tokens to `k` experts. The `T·k` (token, slot) pairs are flattened in
//! row-major order (`flat = token * k + slot`) and *stably* sorted by expert, which gives the order in
//! which grouped GEMMs read their rows (ScatterMoE's `sorted_expert_idxs` / `sorted_scattered_idxs`).
//! Stability matters: it fixes the order of the rows inside an expert segment, and with it the exact
//! summation order of the weight gradients, so every implementation can be compared bit for bit.

/// Errors raised while building routing metadata from expert indices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    /// An expert index is negative or not below the number of experts.
    #[error("expert index {index} at flat position {position} is out of range for {num_experts} experts")]
    ExpertOutOfRange {
        /// The offending index.
        index: i64,
        /// Its flat position `token * k + slot`.
        position: usize,
        /// Number of experts.
        num_experts: usize,
    },
    /// `k` is zero or the index count is not a multiple of it.
    #[error("{len} expert indices do not form whole rows of top_k = {top_k}")]
    BadTopK {
        /// Number of indices.
        len: usize,
        /// Requested `k`.
        top_k: usize,
    },
}

/// Where every (token, slot) pair goes once the pairs are grouped by expert.
///
/// # Shapes
/// - `sorted_flat`: `[T·k]`, the flat (token·k + slot) index of the i-th pair in expert order.
/// - `sorted_token`: `[T·k]`, `sorted_flat[i] / k`: the token row each sorted pair reads.
/// - `counts`: `[E]`, pairs per expert.
/// - `offsets`: `[E + 1]`, exclusive prefix sum of `counts` (segment `e` is `offsets[e]..offsets[e+1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingPlan {
    /// Number of experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Flat pair index in expert order.
    pub sorted_flat: Vec<usize>,
    /// Token index in expert order.
    pub sorted_token: Vec<usize>,
    /// Pairs routed to each expert.
    pub counts: Vec<usize>,
    /// Segment boundaries, `E + 1` entries.
    pub offsets: Vec<usize>,
}

impl RoutingPlan {
    /// Builds the plan from row-major expert indices `[T, k]` with a stable counting sort.
    ///
    /// # Errors
    /// [`RoutingError`] when an index is out of range or the length is not a multiple of `top_k`.
    pub fn from_expert_indices(indices: &[i64], top_k: usize, num_experts: usize) -> Result<Self, RoutingError> {
        if top_k == 0 || indices.len() % top_k != 0 {
            return Err(RoutingError::BadTopK { len: indices.len(), top_k });
        }
        let mut counts = vec![0usize; num_experts];
        for (position, &index) in indices.iter().enumerate() {
            if index < 0 || index as usize >= num_experts {
                return Err(RoutingError::ExpertOutOfRange { index, position, num_experts });
            }
            counts[index as usize] += 1;
        }
        let offsets = exclusive_prefix_sum(&counts);
        let mut cursor = offsets[..num_experts].to_vec();
        let mut sorted_flat = vec![0usize; indices.len()];
        for (flat, &e) in indices.iter().enumerate() {
            let e = e as usize;
            sorted_flat[cursor[e]] = flat;
            cursor[e] += 1;
        }
        let sorted_token = sorted_flat.iter().map(|f| f / top_k).collect();
        Ok(Self { num_experts, top_k, sorted_flat, sorted_token, counts, offsets })
    }

    /// `slots[t·k + j]` = position of pair `(t, j)` in expert order: the inverse of `sorted_flat`,
    /// which the combine step reads each token's expert outputs through.
    pub fn slots(&self) -> Vec<usize> {
        let mut slots = vec![0; self.sorted_flat.len()];
        for (pos, &flat) in self.sorted_flat.iter().enumerate() {
            slots[flat] = pos;
        }
        slots
    }

    /// Number of tokens `T`.
    pub fn num_tokens(&self) -> usize {
        self.sorted_flat.len() / self.top_k
    }

    /// Block indices for a block-sparse layout: each expert segment padded up to a multiple of
    /// `block` rows. Returns `(padded_offsets [E + 1], block_expert [num_blocks])`.
    pub fn padded_blocks(&self, block: usize) -> (Vec<usize>, Vec<usize>) {
        let padded: Vec<usize> = self.counts.iter().map(|c| c.div_ceil(block) * block).collect();
        let padded_offsets = exclusive_prefix_sum(&padded);
        let block_expert = padded
            .iter()
            .enumerate()
            .flat_map(|(e, p)| std::iter::repeat_n(e, p / block))
            .collect();
        (padded_offsets, block_expert)
    }
}

/// `[0, c0, c0 + c1, ...]`, one entry longer than its input.
pub fn exclusive_prefix_sum(counts: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0;
    out.push(0);
    for c in counts {
        acc += c;
        out.push(acc);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_sort_groups_pairs_by_expert() {
        // 4 tokens, k = 2, 3 experts; expert 2 gets no token.
        let idx = [1, 0, 0, 1, 1, 0, 0, 1];
        let plan = RoutingPlan::from_expert_indices(&idx, 2, 3).unwrap();
        assert_eq!(plan.counts, vec![4, 4, 0]);
        assert_eq!(plan.offsets, vec![0, 4, 8, 8]);
        assert_eq!(plan.sorted_flat, vec![1, 2, 5, 6, 0, 3, 4, 7]);
        assert_eq!(plan.sorted_token, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(plan.num_tokens(), 4);
    }

    #[test]
    fn padded_blocks_round_each_segment_up() {
        let idx = [0, 0, 0, 2, 2];
        let plan = RoutingPlan::from_expert_indices(&idx, 1, 3).unwrap();
        let (offsets, blocks) = plan.padded_blocks(2);
        assert_eq!(offsets, vec![0, 4, 4, 6]);
        assert_eq!(blocks, vec![0, 0, 2]);
    }

    #[test]
    fn rejects_bad_indices() {
        assert_eq!(
            RoutingPlan::from_expert_indices(&[0, 5], 1, 4),
            Err(RoutingError::ExpertOutOfRange { index: 5, position: 1, num_experts: 4 })
        );
        assert_eq!(
            RoutingPlan::from_expert_indices(&[0, 1, 2], 2, 4),
            Err(RoutingError::BadTopK { len: 3, top_k: 2 })
        );
        assert!(RoutingPlan::from_expert_indices(&[-1], 1, 4).is_err());
    }

    #[test]
    fn empty_input_is_a_valid_plan() {
        let plan = RoutingPlan::from_expert_indices(&[], 2, 3).unwrap();
        assert_eq!(plan.offsets, vec![0, 0, 0, 0]);
        assert!(plan.sorted_flat.is_empty());
    }
}
