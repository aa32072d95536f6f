//! Block-sparse (MegaBlocks) topology of a dropless expert layer and plain-Rust references of its three
//! products (f64 accumulation, row-major buffers).
//!
//! The (token, slot) pairs sorted by expert are padded per expert to a multiple of the block size `bs`
//! ([`RoutingPlan::padded_blocks`](crate::RoutingPlan::padded_blocks)), giving `Tp` rows. The hidden
//! activations of all experts side by side form a `[Tp, E·Fp]` matrix of which only the blocks where
//! a row's expert meets that expert's columns are nonzero: row block `i` of expert `e` holds column
//! blocks `e·Fp/bs .. (e+1)·Fp/bs`.
//!
//! **F not a multiple of `bs`.** Each expert's hidden width `F` is padded to `Fp = ⌈F/bs⌉·bs`
//! columns *in the sparse layout only*; the weights stay `[E, F, ·]`. A padded column reads no weight
//! (it is computed as zero by the SDD, skipped by the DSD) and produces no weight gradient (the DSᵀD
//! writes only the `F` real columns), so padding never reaches a parameter.
//!
//! Sparse data is stored as MegaBlocks does: `[nnz, bs, bs]`, blocks in block-CSR order (row block
//! major, column blocks ascending), each block row-major.

use std::ops::Range;

/// A block-sparse topology or product that cannot be built as described.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockSparseError {
    /// A size that must be positive is zero.
    #[error("{what} must be positive")]
    ZeroSize {
        /// Which size (`block size`, `expert hidden width`).
        what: &'static str,
    },
    /// A size that disagrees with the topology or with another operand.
    #[error("{what}: got {got}, expected {expected}")]
    Mismatch {
        /// What was compared (e.g. `x rows`, `weight elements`).
        what: &'static str,
        /// The size passed.
        got: usize,
        /// The size the topology implies.
        expected: usize,
    },
    /// A size or index that does not fit the kernels' `u32` index buffers.
    #[error("{what} = {value} does not fit in u32")]
    TooLarge {
        /// Which quantity.
        what: &'static str,
        /// Its value.
        value: usize,
    },
    /// A kernel choice this device, element type or problem cannot run (the tensor-core kernels),
    /// or a grid beyond the device's limits.
    #[error(transparent)]
    Kernel(#[from] crate::scatter::KernelError),
}

/// Block-CSR topology (and its transpose) of the hidden activations of a dropless expert layer.
///
/// Built only from routing counts ([`for_experts`](Self::for_experts)), so it always has the
/// expert-diagonal structure described in the [module docs](self); the kernels themselves only read
/// the generic block-CSR arrays.
///
/// # Shapes
/// - `padded_offsets`: `[E + 1]`, rows of expert `e` are `padded_offsets[e]..padded_offsets[e+1]`
/// - `row_offsets`: `[Tp/bs + 1]`; `row_indices`, `column_indices`: `[nnz]`
/// - `column_offsets`: `[E·Fp/bs + 1]`; `row_indices_t`, `block_offsets_t`: `[nnz]` (transposed order)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSparseTopology {
    block: usize,
    num_experts: usize,
    ffn: usize,
    ffn_padded: usize,
    padded_offsets: Vec<usize>,
    row_offsets: Vec<usize>,
    row_indices: Vec<usize>,
    column_indices: Vec<usize>,
    column_offsets: Vec<usize>,
    row_indices_t: Vec<usize>,
    block_offsets_t: Vec<usize>,
}

impl BlockSparseTopology {
    /// Topology for `counts[e]` rows routed to expert `e`, hidden width `ffn`, blocks of `block`.
    ///
    /// # Errors
    /// [`BlockSparseError::ZeroSize`] when `block` or `ffn` is zero.
    pub fn for_experts(counts: &[usize], ffn: usize, block: usize) -> Result<Self, BlockSparseError> {
        if block == 0 {
            return Err(BlockSparseError::ZeroSize { what: "block size" });
        }
        if ffn == 0 {
            return Err(BlockSparseError::ZeroSize { what: "expert hidden width" });
        }
        let num_experts = counts.len();
        let ffn_padded = ffn.div_ceil(block) * block;
        let per_expert = ffn_padded / block;
        let padded: Vec<usize> = counts.iter().map(|c| c.div_ceil(block) * block).collect();
        let padded_offsets = crate::reference::routing::exclusive_prefix_sum(&padded);

        let mut row_offsets = vec![0];
        let mut row_indices = Vec::new();
        let mut column_indices = Vec::new();
        for (e, p) in padded.iter().enumerate() {
            for _ in 0..p / block {
                let row_block = row_offsets.len() - 1;
                for j in e * per_expert..(e + 1) * per_expert {
                    row_indices.push(row_block);
                    column_indices.push(j);
                }
                row_offsets.push(column_indices.len());
            }
        }

        // Transpose by a stable counting sort on the column: within a column, row blocks ascend.
        let col_blocks = num_experts * per_expert;
        let mut col_counts = vec![0usize; col_blocks];
        for &j in &column_indices {
            col_counts[j] += 1;
        }
        let column_offsets = crate::reference::routing::exclusive_prefix_sum(&col_counts);
        let mut cursor = column_offsets[..col_blocks].to_vec();
        let nnz = column_indices.len();
        let mut row_indices_t = vec![0usize; nnz];
        let mut block_offsets_t = vec![0usize; nnz];
        for (b, &j) in column_indices.iter().enumerate() {
            row_indices_t[cursor[j]] = row_indices[b];
            block_offsets_t[cursor[j]] = b;
            cursor[j] += 1;
        }
        Ok(Self {
            block,
            num_experts,
            ffn,
            ffn_padded,
            padded_offsets,
            row_offsets,
            row_indices,
            column_indices,
            column_offsets,
            row_indices_t,
            block_offsets_t,
        })
    }

    /// Block size `bs`.
    pub fn block(&self) -> usize {
        self.block
    }
    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// Hidden width of one expert `F` (as stored in the weights).
    pub fn ffn(&self) -> usize {
        self.ffn
    }
    /// `F` rounded up to a multiple of the block size.
    pub fn ffn_padded(&self) -> usize {
        self.ffn_padded
    }
    /// Padded rows `Tp`.
    pub fn rows(&self) -> usize {
        self.padded_offsets[self.num_experts]
    }
    /// Columns of the sparse matrix, `E·Fp`.
    pub fn cols(&self) -> usize {
        self.num_experts * self.ffn_padded
    }
    /// Nonzero blocks.
    pub fn nnz(&self) -> usize {
        self.column_indices.len()
    }
    /// Row blocks, `Tp / bs`.
    pub fn row_blocks(&self) -> usize {
        self.row_offsets.len() - 1
    }
    /// Column blocks, `E·Fp / bs`.
    pub fn col_blocks(&self) -> usize {
        self.column_offsets.len() - 1
    }
    /// Column blocks of one expert, `Fp / bs` (every row block has exactly this many).
    pub fn blocks_per_row(&self) -> usize {
        self.ffn_padded / self.block
    }
    /// Padded row boundaries of the experts, `[E + 1]`.
    pub fn padded_offsets(&self) -> &[usize] {
        &self.padded_offsets
    }
    /// Rows of expert `e` in the padded layout.
    pub fn expert_rows(&self, e: usize) -> Range<usize> {
        self.padded_offsets[e]..self.padded_offsets[e + 1]
    }
    /// Nonzero blocks of expert `e` (contiguous in block-CSR order).
    pub fn expert_blocks(&self, e: usize) -> Range<usize> {
        let rows = self.expert_rows(e);
        self.row_offsets[rows.start / self.block]..self.row_offsets[rows.end / self.block]
    }
    /// Block-CSR row offsets, `[Tp/bs + 1]`.
    pub fn row_offsets(&self) -> &[usize] {
        &self.row_offsets
    }
    /// Row block of each nonzero block, `[nnz]`.
    pub fn row_indices(&self) -> &[usize] {
        &self.row_indices
    }
    /// Column block of each nonzero block, `[nnz]`.
    pub fn column_indices(&self) -> &[usize] {
        &self.column_indices
    }
    /// Transposed topology: offsets per column block, `[E·Fp/bs + 1]`.
    pub fn column_offsets(&self) -> &[usize] {
        &self.column_offsets
    }
    /// Transposed topology: row block of each entry, `[nnz]`.
    pub fn row_indices_t(&self) -> &[usize] {
        &self.row_indices_t
    }
    /// Transposed topology: index into the block-CSR data of each entry, `[nnz]`.
    pub fn block_offsets_t(&self) -> &[usize] {
        &self.block_offsets_t
    }
    /// Elements of the sparse data, `nnz · bs²`.
    pub fn sparse_len(&self) -> usize {
        self.nnz() * self.block * self.block
    }

    /// The weight row (in `[E·F, ·]`) of sparse column `n`, or `None` for a padded column.
    fn weight_column(&self, n: usize) -> Option<(usize, usize)> {
        let (e, c) = (n / self.ffn_padded, n % self.ffn_padded);
        (c < self.ffn).then_some((e, c))
    }
}

/// Index of `w[e][c][o]` (`ffn_major`, `w: [E, F, O]`) or `w[e][o][c]` (`w: [E, O, F]`).
fn weight_index(e: usize, c: usize, o: usize, ffn: usize, other: usize, ffn_major: bool) -> usize {
    if ffn_major { (e * ffn + c) * other + o } else { (e * other + o) * ffn + c }
}

/// SDD: the nonzero blocks of `x · Wᵀ` where column `e·Fp + c` of `Wᵀ` is expert `e`'s row `c`:
/// `w: [E, F, K]` when `transpose` (PyTorch `[out, in]`), else `w: [E, K, F]`. Padded columns are 0.
///
/// # Shapes
/// - `x`: `[Tp, K]` → `[nnz, bs, bs]`
pub fn sdd(topo: &BlockSparseTopology, x: &[f32], w: &[f32], k: usize, transpose: bool) -> Vec<f32> {
    let bs = topo.block;
    let mut out = vec![0f32; topo.sparse_len()];
    for b in 0..topo.nnz() {
        let (i, j) = (topo.row_indices[b], topo.column_indices[b]);
        for r in 0..bs {
            for c in 0..bs {
                let Some((e, cc)) = topo.weight_column(j * bs + c) else { continue };
                let row = i * bs + r;
                let acc: f64 = (0..k)
                    .map(|l| x[row * k + l] as f64 * w[weight_index(e, cc, l, topo.ffn, k, transpose)] as f64)
                    .sum();
                out[(b * bs + r) * bs + c] = acc as f32;
            }
        }
    }
    out
}

/// DSD: `s · W` with `s` sparse `[Tp, E·Fp]` and row `e·Fp + c` of `W` expert `e`'s column `c`:
/// `w: [E, M, F]` when `transpose`, else `w: [E, F, M]`. Padded columns of `s` are ignored.
///
/// # Shapes
/// - `s`: `[nnz, bs, bs]` → `[Tp, M]`
pub fn dsd(topo: &BlockSparseTopology, s: &[f32], w: &[f32], m: usize, transpose: bool) -> Vec<f32> {
    let bs = topo.block;
    let mut out = vec![0f32; topo.rows() * m];
    for i in 0..topo.row_blocks() {
        for r in 0..bs {
            for o in 0..m {
                let mut acc = 0f64;
                for b in topo.row_offsets[i]..topo.row_offsets[i + 1] {
                    for c in 0..bs {
                        let Some((e, cc)) = topo.weight_column(topo.column_indices[b] * bs + c) else { continue };
                        let wv = w[weight_index(e, cc, o, topo.ffn, m, !transpose)];
                        acc += s[(b * bs + r) * bs + c] as f64 * wv as f64;
                    }
                }
                out[(i * bs + r) * m + o] = acc as f32;
            }
        }
    }
    out
}

/// DSᵀD: `sᵀ · d` restricted to the real columns, walking the transposed topology:
/// `out[e, c, o] = Σ_r s[r, e·Fp + c] · d[r, o]`, as `[E, F, M]`, or `[E, M, F]` when `transpose_out`.
///
/// # Shapes
/// - `s`: `[nnz, bs, bs]`, `d`: `[Tp, M]` → `[E, F, M]` or `[E, M, F]`
pub fn dstd(topo: &BlockSparseTopology, s: &[f32], d: &[f32], m: usize, transpose_out: bool) -> Vec<f32> {
    let bs = topo.block;
    let mut out = vec![0f32; topo.num_experts * topo.ffn * m];
    for e in 0..topo.num_experts {
        for c in 0..topo.ffn {
            let n = e * topo.ffn_padded + c;
            let (j, cb) = (n / bs, n % bs);
            for o in 0..m {
                let mut acc = 0f64;
                for t in topo.column_offsets[j]..topo.column_offsets[j + 1] {
                    let (i, b) = (topo.row_indices_t[t], topo.block_offsets_t[t]);
                    for r in 0..bs {
                        acc += s[(b * bs + r) * bs + cb] as f64 * d[(i * bs + r) * m + o] as f64;
                    }
                }
                out[weight_index(e, c, o, topo.ffn, m, !transpose_out)] = acc as f32;
            }
        }
    }
    out
}

/// The sparse data as a dense row-major `[Tp, E·Fp]` matrix (zeros outside the topology).
pub fn to_dense(topo: &BlockSparseTopology, s: &[f32]) -> Vec<f32> {
    let bs = topo.block;
    let cols = topo.cols();
    let mut out = vec![0f32; topo.rows() * cols];
    for b in 0..topo.nnz() {
        let (i, j) = (topo.row_indices[b], topo.column_indices[b]);
        for r in 0..bs {
            for c in 0..bs {
                out[(i * bs + r) * cols + j * bs + c] = s[(b * bs + r) * bs + c];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_is_expert_diagonal_with_its_transpose() {
        // Expert 0: 3 rows -> 2 blocks of 2; expert 1: none; expert 2: 2 rows -> 1 block. F = 3 -> Fp = 4.
        let t = BlockSparseTopology::for_experts(&[3, 0, 2], 3, 2).unwrap();
        assert_eq!((t.rows(), t.cols(), t.ffn_padded(), t.blocks_per_row()), (6, 12, 4, 2));
        assert_eq!(t.padded_offsets(), &[0, 4, 4, 6]);
        assert_eq!(t.row_offsets(), &[0, 2, 4, 6]);
        assert_eq!(t.row_indices(), &[0, 0, 1, 1, 2, 2]);
        assert_eq!(t.column_indices(), &[0, 1, 0, 1, 4, 5]);
        assert_eq!(t.column_offsets(), &[0, 2, 4, 4, 4, 5, 6]);
        assert_eq!(t.row_indices_t(), &[0, 1, 0, 1, 2, 2]);
        assert_eq!(t.block_offsets_t(), &[0, 2, 1, 3, 4, 5]);
        assert_eq!(t.expert_blocks(0), 0..4);
        assert_eq!(t.expert_blocks(1), 4..4);
        assert_eq!(t.expert_blocks(2), 4..6);
    }

    #[test]
    fn zero_sizes_are_rejected() {
        assert_eq!(
            BlockSparseTopology::for_experts(&[1], 4, 0),
            Err(BlockSparseError::ZeroSize { what: "block size" })
        );
        assert!(BlockSparseTopology::for_experts(&[1], 0, 4).is_err());
    }

    #[test]
    fn padded_columns_are_zero_and_carry_no_gradient() {
        // One expert, one token, F = 1 padded to 2: column 1 must stay zero whatever x is.
        let t = BlockSparseTopology::for_experts(&[1], 1, 2).unwrap();
        let x = [1.0, 2.0, 0.0, 0.0]; // [Tp = 2, K = 2], row 1 is padding
        let w = [3.0, 4.0]; // [E = 1, F = 1, K = 2]
        assert_eq!(sdd(&t, &x, &w, 2, true), vec![11.0, 0.0, 0.0, 0.0]);
        let s = [1.0, 100.0, 0.0, 0.0]; // the padded column holds garbage: the DSD must ignore it
        assert_eq!(dsd(&t, &s, &[5.0, 6.0], 2, false), vec![5.0, 6.0, 0.0, 0.0]);
        assert_eq!(dstd(&t, &s, &[1.0, 2.0, 0.0, 0.0], 2, false), vec![1.0, 2.0]);
    }
}
