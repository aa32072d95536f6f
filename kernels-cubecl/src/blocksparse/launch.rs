//! Launch functions: validate a data-free problem against the host topology, pick the grid, launch.
//!
//! Dense buffers are raw CubeCL handles holding contiguous row-major data of the element type `F`;
//! sparse buffers hold `[nnz, bs, bs]` blocks in block-CSR order; the topology lives on the device
//! as `u32` arrays ([`TopologyBuffers`]).

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::kernel::{dsd_kernel, dstd_kernel, sdd_kernel};
use crate::reference::blocksparse::{BlockSparseError, BlockSparseTopology};

/// Threads per cube (one output element per thread).
const CUBE_THREADS: u32 = 256;

fn cube_dim() -> CubeDim {
    CubeDim::new_1d(CUBE_THREADS)
}

/// A block-sparse product of an expert layer, without data.
///
/// - SDD: `x: [rows, dense]` times the weights (`[E, F, dense]` when `transpose`, else
///   `[E, dense, F]`) → sparse `[nnz, bs, bs]`.
/// - DSD: sparse times the weights (`[E, dense, F]` when `transpose`, else `[E, F, dense]`) →
///   `[rows, dense]`.
/// - DSᵀD: sparseᵀ times `d: [rows, dense]` → `[E, F, dense]`, or `[E, dense, F]` when `transpose`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSparseProblem {
    /// Block size `bs`.
    pub block: usize,
    /// Padded rows `Tp` (a multiple of `bs`).
    pub rows: usize,
    /// Width of the dense operand: `K` of the SDD, `M` of the DSD and DSᵀD.
    pub dense: usize,
    /// Number of experts `E`.
    pub num_experts: usize,
    /// Hidden width of one expert `F` (unpadded, as in the weights).
    pub ffn: usize,
    /// Weight (or, for the DSᵀD, output) orientation; see the type docs.
    pub transpose: bool,
}

impl BlockSparseProblem {
    /// The problem of `topology` with a dense operand of width `dense`.
    pub fn for_topology(topology: &BlockSparseTopology, dense: usize, transpose: bool) -> Self {
        Self {
            block: topology.block(),
            rows: topology.rows(),
            dense,
            num_experts: topology.num_experts(),
            ffn: topology.ffn(),
            transpose,
        }
    }

    /// Checks that the problem describes `topology`.
    ///
    /// # Errors
    /// [`BlockSparseError::ZeroSize`] for a zero block size or hidden width,
    /// [`BlockSparseError::Mismatch`] naming the size that differs from the topology.
    pub fn validate(&self, topology: &BlockSparseTopology) -> Result<(), BlockSparseError> {
        if self.block == 0 {
            return Err(BlockSparseError::ZeroSize { what: "block size" });
        }
        if self.ffn == 0 {
            return Err(BlockSparseError::ZeroSize { what: "expert hidden width" });
        }
        let checks = [
            ("block size", self.block, topology.block()),
            ("padded rows", self.rows, topology.rows()),
            ("number of experts", self.num_experts, topology.num_experts()),
            ("expert hidden width", self.ffn, topology.ffn()),
        ];
        for (what, got, expected) in checks {
            if got != expected {
                return Err(BlockSparseError::Mismatch { what, got, expected });
            }
        }
        Ok(())
    }

    /// Elements of the dense operand `[rows, dense]`.
    pub fn dense_len(&self) -> usize {
        self.rows * self.dense
    }

    /// Elements of the weights (and of the DSᵀD output), `E · F · dense`.
    pub fn weight_len(&self) -> usize {
        self.num_experts * self.ffn * self.dense
    }
}

/// The topology's index arrays on the device (`u32`).
#[derive(Debug, Clone)]
pub struct TopologyBuffers {
    /// `[Tp/bs + 1]`.
    pub row_offsets: Handle,
    /// `[nnz]`.
    pub row_indices: Handle,
    /// `[nnz]`.
    pub column_indices: Handle,
    /// `[E·Fp/bs + 1]`.
    pub column_offsets: Handle,
    /// `[nnz]`, transposed order.
    pub row_indices_t: Handle,
    /// `[nnz]`, transposed order.
    pub block_offsets_t: Handle,
}

impl TopologyBuffers {
    /// Uploads `topology`.
    ///
    /// # Errors
    /// [`BlockSparseError::TooLarge`] when an index does not fit in `u32`.
    pub fn upload<R: Runtime>(client: &ComputeClient<R>, topology: &BlockSparseTopology) -> Result<Self, BlockSparseError> {
        let up = |what: &'static str, v: &[usize]| -> Result<Handle, BlockSparseError> {
            let host = v
                .iter()
                .map(|&x| u32::try_from(x).map_err(|_| BlockSparseError::TooLarge { what, value: x }))
                .collect::<Result<Vec<u32>, _>>()?;
            // Zero-length buffers are not allowed by every runtime; a placeholder is never read.
            Ok(client.create_from_slice(u32::as_bytes(if host.is_empty() { &[0] } else { &host })))
        };
        Ok(Self {
            row_offsets: up("row offset", topology.row_offsets())?,
            row_indices: up("row block", topology.row_indices())?,
            column_indices: up("column block", topology.column_indices())?,
            column_offsets: up("column offset", topology.column_offsets())?,
            row_indices_t: up("row block", topology.row_indices_t())?,
            block_offsets_t: up("block offset", topology.block_offsets_t())?,
        })
    }
}

/// SDD into `out: [nnz, bs, bs]` (every element written; padded columns get zero).
///
/// # Errors
/// [`BlockSparseError`] when the problem does not describe the topology.
#[allow(clippy::too_many_arguments)]
pub fn launch_sdd<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &BlockSparseProblem,
    topology: &BlockSparseTopology,
    buffers: &TopologyBuffers,
    x: Handle,
    w: Handle,
    out: Handle,
) -> Result<(), BlockSparseError> {
    problem.validate(topology)?;
    let p = problem;
    let total = topology.sparse_len();
    if total == 0 {
        return Ok(());
    }
    let nnz = topology.nnz();
    let count = cubecl::calculate_cube_count_elemwise(client, total, cube_dim());
    unsafe {
        sdd_kernel::launch::<F, R>(
            client,
            count,
            cube_dim(),
            ArrayArg::from_raw_parts(x, p.dense_len().max(1)),
            ArrayArg::from_raw_parts(w, p.weight_len().max(1)),
            ArrayArg::from_raw_parts(buffers.row_indices.clone(), nnz),
            ArrayArg::from_raw_parts(buffers.column_indices.clone(), nnz),
            ArrayArg::from_raw_parts(out, total),
            p.dense,
            p.block,
            p.ffn,
            topology.ffn_padded(),
            p.transpose,
        );
    }
    Ok(())
}

/// DSD into `out: [rows, dense]` (every element written).
///
/// # Errors
/// [`BlockSparseError`] when the problem does not describe the topology.
#[allow(clippy::too_many_arguments)]
pub fn launch_dsd<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &BlockSparseProblem,
    topology: &BlockSparseTopology,
    buffers: &TopologyBuffers,
    s: Handle,
    w: Handle,
    out: Handle,
) -> Result<(), BlockSparseError> {
    problem.validate(topology)?;
    let p = problem;
    let total = p.dense_len();
    if total == 0 {
        return Ok(());
    }
    let count = cubecl::calculate_cube_count_elemwise(client, total, cube_dim());
    unsafe {
        dsd_kernel::launch::<F, R>(
            client,
            count,
            cube_dim(),
            ArrayArg::from_raw_parts(s, topology.sparse_len().max(1)),
            ArrayArg::from_raw_parts(w, p.weight_len().max(1)),
            ArrayArg::from_raw_parts(buffers.row_offsets.clone(), topology.row_blocks() + 1),
            ArrayArg::from_raw_parts(buffers.column_indices.clone(), topology.nnz().max(1)),
            ArrayArg::from_raw_parts(out, total),
            p.dense,
            p.block,
            p.ffn,
            topology.ffn_padded(),
            p.transpose,
        );
    }
    Ok(())
}

/// DSᵀD into `out: [E, F, dense]` (or `[E, dense, F]` when `problem.transpose`), every element
/// written: experts without rows get zeros.
///
/// # Errors
/// [`BlockSparseError`] when the problem does not describe the topology.
#[allow(clippy::too_many_arguments)]
pub fn launch_dstd<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &BlockSparseProblem,
    topology: &BlockSparseTopology,
    buffers: &TopologyBuffers,
    s: Handle,
    d: Handle,
    out: Handle,
) -> Result<(), BlockSparseError> {
    problem.validate(topology)?;
    let p = problem;
    let total = p.weight_len();
    if total == 0 {
        return Ok(());
    }
    let nnz = topology.nnz().max(1);
    let count = cubecl::calculate_cube_count_elemwise(client, total, cube_dim());
    unsafe {
        dstd_kernel::launch::<F, R>(
            client,
            count,
            cube_dim(),
            ArrayArg::from_raw_parts(s, topology.sparse_len().max(1)),
            ArrayArg::from_raw_parts(d, p.dense_len().max(1)),
            ArrayArg::from_raw_parts(buffers.column_offsets.clone(), topology.col_blocks() + 1),
            ArrayArg::from_raw_parts(buffers.row_indices_t.clone(), nnz),
            ArrayArg::from_raw_parts(buffers.block_offsets_t.clone(), nnz),
            ArrayArg::from_raw_parts(out, total),
            p.dense,
            p.block,
            p.ffn,
            topology.ffn_padded(),
            p.transpose,
        );
    }
    Ok(())
}
