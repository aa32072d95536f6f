//! Launch functions: validate a data-free problem against the host topology, pick the grid, launch.
//!
//! Dense buffers are raw CubeCL handles holding contiguous row-major data of the element type `F`;
//! sparse buffers hold `[nnz, bs, bs]` blocks in block-CSR order; the topology lives on the device
//! as `u32` arrays ([`TopologyBuffers`]).
//!
//! Each product has two implementations ([`BlockSparseStrategy`]): the one-element-per-unit kernels
//! (any float type, any block size) and, for block size 128 with f16/bf16 on a runtime with
//! tensor cores and cube barriers (CUDA), the pipelined tensor-core kernels of [`super::cmma`].
//! `launch_*` pick with [`BlockSparseStrategy::Auto`]; `launch_*_with` take the choice and return
//! what ran.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::cmma::{CMMA_SPARSE_BLOCK, block_sparse_forward_cmma_kernel, block_sparse_weight_grad_cmma_kernel};
use super::kernel::{dsd_kernel, dstd_kernel, sdd_kernel};
use crate::reference::blocksparse::{BlockSparseError, BlockSparseTopology};
use crate::scatter::gemm::{CMMA_BLOCK_M, CMMA_BLOCK_N};
use crate::scatter::gemm_pipelined::plane_layout;
use crate::scatter::launch::check_pipeline;
use crate::scatter::{GroupedMatmulProblem, KernelError, cmma_pipelined_supported};

/// Threads per cube (one output element per thread).
const CUBE_THREADS: u32 = 256;

/// Which kernels compute a block-sparse product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSparseStrategy {
    /// [`BLOCK_SPARSE_CMMA_DEFAULT`] (SDD, DSD) or [`BLOCK_SPARSE_CMMA_WEIGHT_GRAD_DEFAULT`] (DSᵀD)
    /// where [`block_sparse_cmma_supported`], else [`Naive`](Self::Naive).
    Auto,
    /// One unit per output element (any float type and block size; the reference-like baseline).
    Naive,
    /// The pipelined tensor-core kernels (block size 128 only): asynchronous copies `stages` steps
    /// of `block_k` ahead of the tensor cores, as
    /// [`GroupedMatmulStrategy::CmmaPipelined`](crate::scatter::GroupedMatmulStrategy::CmmaPipelined).
    CmmaPipelined {
        /// Reduction depth per step: 32 or 64.
        block_k: usize,
        /// Steps in flight: 2 to 4.
        stages: usize,
        /// The wide plane layout (4 planes of 64 × 64 per cube), as for the grouped GEMM.
        wide: bool,
    },
}

/// What [`BlockSparseStrategy::Auto`] runs for the SDD and DSD where the tensor cores can: the
/// configuration measured fastest for the grouped forward GEMM these kernels are built on
/// ([`CMMA_PIPELINED_DEFAULT`](crate::scatter::CMMA_PIPELINED_DEFAULT)).
pub const BLOCK_SPARSE_CMMA_DEFAULT: BlockSparseStrategy = BlockSparseStrategy::CmmaPipelined { block_k: 64, stages: 2, wide: true };

/// The same for the DSᵀD, after the grouped weight gradient
/// ([`CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT`](crate::scatter::CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT)).
pub const BLOCK_SPARSE_CMMA_WEIGHT_GRAD_DEFAULT: BlockSparseStrategy = BlockSparseStrategy::CmmaPipelined { block_k: 32, stages: 4, wide: true };

/// Whether [`BlockSparseStrategy::CmmaPipelined`] can run `problem` for element type `F` here: block
/// size 128, and what [`cmma_pipelined_supported`] asks of a grouped GEMM (f16/bf16 cmma, cube
/// barriers with async copies) with `F` and the dense width multiples of 8.
pub fn block_sparse_cmma_supported<R: Runtime, F: Float + CubeElement>(client: &ComputeClient<R>, problem: &BlockSparseProblem) -> bool {
    // Both widths are read in 8-element vectors by every product: as `m` and `k` of a GEMM whose
    // `w` is `[E, k, m]` (the stricter vector condition).
    let gemm = GroupedMatmulProblem {
        rows: problem.rows,
        m: problem.ffn,
        k: problem.dense,
        num_experts: problem.num_experts,
        transpose: false,
    };
    problem.block == CMMA_SPARSE_BLOCK && cmma_pipelined_supported::<R, F>(client, &gemm)
}

/// What `strategy` means for `problem` on this device (`pipelined`: the `Auto` configuration).
fn resolve<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &BlockSparseProblem,
    strategy: BlockSparseStrategy,
    pipelined: BlockSparseStrategy,
    what: &str,
) -> Result<BlockSparseStrategy, BlockSparseError> {
    match strategy {
        BlockSparseStrategy::Auto if block_sparse_cmma_supported::<R, F>(client, problem) => Ok(pipelined),
        BlockSparseStrategy::Auto | BlockSparseStrategy::Naive => Ok(BlockSparseStrategy::Naive),
        BlockSparseStrategy::CmmaPipelined { block_k, stages, .. } => {
            check_pipeline(block_k, stages)?;
            if block_sparse_cmma_supported::<R, F>(client, problem) {
                Ok(strategy)
            } else if problem.block != CMMA_SPARSE_BLOCK {
                Err(KernelError::Unsupported(format!(
                    "tensor-core block-sparse {what}: block size {} is not supported (the kernels need block size {CMMA_SPARSE_BLOCK})",
                    problem.block
                ))
                .into())
            } else {
                Err(KernelError::Unsupported(format!(
                    "tensor-core block-sparse {what} needs f16/bf16 cmma and cube barriers with async copies on this device, and the \
                     hidden width ({}) and dense width ({}) multiples of 8",
                    problem.ffn, problem.dense
                ))
                .into())
            }
        }
    }
}

/// A static grid checked against the device's cube-count limits.
fn checked_grid<R: Runtime>(client: &ComputeClient<R>, x: usize, y: usize, z: usize, what: &str) -> Result<CubeCount, BlockSparseError> {
    let (mx, my, mz) = client.properties().hardware.max_cube_count;
    match (u32::try_from(x), u32::try_from(y), u32::try_from(z)) {
        (Ok(a), Ok(b), Ok(c)) if a <= mx && b <= my && c <= mz => Ok(CubeCount::Static(a, b, c)),
        _ => Err(KernelError::Shape(format!(
            "tensor-core block-sparse {what}: grid {x} x {y} x {z} exceeds the device limit {mx} x {my} x {mz}"
        ))
        .into()),
    }
}

/// The padded expert offsets (`[E + 1]`) and the `(expert, first row)` pair of every row block, as
/// device buffers, for the tensor-core kernels.
fn upload_segments<R: Runtime>(
    client: &ComputeClient<R>,
    problem: &BlockSparseProblem,
    topology: &BlockSparseTopology,
) -> Result<(Handle, Handle, usize), BlockSparseError> {
    let gemm = GroupedMatmulProblem {
        rows: problem.rows,
        m: 1,
        k: 1,
        num_experts: problem.num_experts,
        transpose: false,
    };
    let tiles = gemm.row_tiles(topology.padded_offsets(), CMMA_BLOCK_M)?;
    let offsets = topology
        .padded_offsets()
        .iter()
        .map(|&v| u32::try_from(v).map_err(|_| BlockSparseError::TooLarge { what: "padded row offset", value: v }))
        .collect::<Result<Vec<u32>, _>>()?;
    let tiles_len = tiles.len();
    let tiles = client.create_from_slice(u32::as_bytes(if tiles.is_empty() { &[0] } else { &tiles }));
    Ok((client.create_from_slice(u32::as_bytes(&offsets)), tiles, tiles_len))
}

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

/// SDD into `out: [nnz, bs, bs]` (every element written; padded columns get zero) with
/// [`BlockSparseStrategy::Auto`].
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
    launch_sdd_with::<R, F>(client, problem, topology, buffers, x, w, out, BlockSparseStrategy::Auto).map(|_| ())
}

/// SDD with an explicit kernel choice; returns the kernel that ran (what `Auto` resolved to).
///
/// # Errors
/// [`BlockSparseError`] when the problem does not describe the topology;
/// [`BlockSparseError::Kernel`] with [`KernelError::Unsupported`] for `CmmaPipelined` where
/// [`block_sparse_cmma_supported`] is false or the configuration is not one of the supported ones.
#[allow(clippy::too_many_arguments)]
pub fn launch_sdd_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &BlockSparseProblem,
    topology: &BlockSparseTopology,
    buffers: &TopologyBuffers,
    x: Handle,
    w: Handle,
    out: Handle,
    strategy: BlockSparseStrategy,
) -> Result<BlockSparseStrategy, BlockSparseError> {
    problem.validate(topology)?;
    let p = problem;
    let strategy = resolve::<R, F>(client, p, strategy, BLOCK_SPARSE_CMMA_DEFAULT, "SDD")?;
    let total = topology.sparse_len();
    if total == 0 {
        return Ok(strategy);
    }
    let nnz = topology.nnz();
    match strategy {
        BlockSparseStrategy::CmmaPipelined { block_k, stages, wide } => {
            let nb = topology.blocks_per_row();
            let count = checked_grid(client, topology.row_blocks(), nb, 1, "SDD")?;
            let (offsets, tiles, tiles_len) = upload_segments(client, p, topology)?;
            // SAFETY: every global access of the kernel is bounds-checked against the padded
            // segments and `F` / `dense` (zero-length copies past them); the block-storage writes
            // stay inside `[nnz, 128, 128]` since the grid is (row blocks, blocks per row).
            unsafe {
                block_sparse_forward_cmma_kernel::launch_unchecked::<F, R>(
                    client,
                    count,
                    plane_layout(wide).cube_dim(),
                    8,
                    ArrayArg::from_raw_parts(x, p.dense_len().max(8) / 8),
                    ArrayArg::from_raw_parts(w, p.weight_len().max(8) / 8),
                    ArrayArg::from_raw_parts(offsets, p.num_experts + 1),
                    ArrayArg::from_raw_parts(tiles, tiles_len.max(1)),
                    ArrayArg::from_raw_parts(out, total),
                    p.ffn,
                    p.dense,
                    nb,
                    p.transpose,
                    false,
                    true,
                    block_k,
                    stages,
                    wide,
                );
            }
        }
        _ => {
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
        }
    }
    Ok(strategy)
}

/// DSD into `out: [rows, dense]` (every element written) with [`BlockSparseStrategy::Auto`].
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
    launch_dsd_with::<R, F>(client, problem, topology, buffers, s, w, out, BlockSparseStrategy::Auto).map(|_| ())
}

/// DSD with an explicit kernel choice; returns the kernel that ran.
///
/// # Errors
/// As [`launch_sdd_with`].
#[allow(clippy::too_many_arguments)]
pub fn launch_dsd_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &BlockSparseProblem,
    topology: &BlockSparseTopology,
    buffers: &TopologyBuffers,
    s: Handle,
    w: Handle,
    out: Handle,
    strategy: BlockSparseStrategy,
) -> Result<BlockSparseStrategy, BlockSparseError> {
    problem.validate(topology)?;
    let p = problem;
    let strategy = resolve::<R, F>(client, p, strategy, BLOCK_SPARSE_CMMA_DEFAULT, "DSD")?;
    let total = p.dense_len();
    if total == 0 {
        return Ok(strategy);
    }
    match strategy {
        BlockSparseStrategy::CmmaPipelined { block_k, stages, wide } => {
            let count = checked_grid(client, topology.row_blocks(), p.dense.div_ceil(CMMA_BLOCK_N), 1, "DSD")?;
            let (offsets, tiles, tiles_len) = upload_segments(client, p, topology)?;
            // SAFETY: every access is bounds-checked in the kernel (sparse reads bounded by `F`
            // inside the row block's own nonzero blocks, weight reads by `F` / `dense`, writes by
            // the padded segment and `dense`).
            unsafe {
                block_sparse_forward_cmma_kernel::launch_unchecked::<F, R>(
                    client,
                    count,
                    plane_layout(wide).cube_dim(),
                    8,
                    ArrayArg::from_raw_parts(s, topology.sparse_len().max(8) / 8),
                    ArrayArg::from_raw_parts(w, p.weight_len().max(8) / 8),
                    ArrayArg::from_raw_parts(offsets, p.num_experts + 1),
                    ArrayArg::from_raw_parts(tiles, tiles_len.max(1)),
                    ArrayArg::from_raw_parts(out, total),
                    p.dense,
                    p.ffn,
                    topology.blocks_per_row(),
                    p.transpose,
                    true,
                    false,
                    block_k,
                    stages,
                    wide,
                );
            }
        }
        _ => {
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
        }
    }
    Ok(strategy)
}

/// DSᵀD into `out: [E, F, dense]` (or `[E, dense, F]` when `problem.transpose`), every element
/// written: experts without rows get zeros. Uses [`BlockSparseStrategy::Auto`].
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
    launch_dstd_with::<R, F>(client, problem, topology, buffers, s, d, out, BlockSparseStrategy::Auto).map(|_| ())
}

/// DSᵀD with an explicit kernel choice; returns the kernel that ran.
///
/// # Errors
/// As [`launch_sdd_with`].
#[allow(clippy::too_many_arguments)]
pub fn launch_dstd_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &BlockSparseProblem,
    topology: &BlockSparseTopology,
    buffers: &TopologyBuffers,
    s: Handle,
    d: Handle,
    out: Handle,
    strategy: BlockSparseStrategy,
) -> Result<BlockSparseStrategy, BlockSparseError> {
    problem.validate(topology)?;
    let p = problem;
    let strategy = resolve::<R, F>(client, p, strategy, BLOCK_SPARSE_CMMA_WEIGHT_GRAD_DEFAULT, "DSTD")?;
    let total = p.weight_len();
    if total == 0 {
        return Ok(strategy);
    }
    match strategy {
        BlockSparseStrategy::CmmaPipelined { block_k, stages, wide } => {
            // `out[e] = Aᵀ · B` over expert e's padded rows: A = S, B = d for `[E, F, dense]`;
            // A = d, B = S for `[E, dense, F]`.
            let sparse_a = !p.transpose;
            let (m, k) = if sparse_a { (p.ffn, p.dense) } else { (p.dense, p.ffn) };
            let count = checked_grid(client, m.div_ceil(CMMA_BLOCK_M), k.div_ceil(CMMA_BLOCK_N), p.num_experts, "DSTD")?;
            let (offsets, _, _) = upload_segments(client, p, topology)?;
            // SAFETY: plain handle + length pairs; the lengths are the problem's, in 8-element vectors.
            let s_arg = unsafe { ArrayArg::from_raw_parts(s, topology.sparse_len().max(8) / 8) };
            let d_arg = unsafe { ArrayArg::from_raw_parts(d, p.dense_len().max(8) / 8) };
            let (a, b) = if sparse_a { (s_arg, d_arg) } else { (d_arg, s_arg) };
            // SAFETY: every access is bounds-checked in the kernel against the padded segment ends,
            // `F` and `dense` (zero-length copies past them); writes are bounded by `m` and `k`.
            unsafe {
                block_sparse_weight_grad_cmma_kernel::launch_unchecked::<F, R>(
                    client,
                    count,
                    plane_layout(wide).cube_dim(),
                    8,
                    a,
                    b,
                    ArrayArg::from_raw_parts(offsets, p.num_experts + 1),
                    ArrayArg::from_raw_parts(out, total),
                    m,
                    k,
                    topology.blocks_per_row(),
                    sparse_a,
                    block_k,
                    stages,
                    wide,
                );
            }
        }
        _ => {
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
        }
    }
    Ok(strategy)
}
