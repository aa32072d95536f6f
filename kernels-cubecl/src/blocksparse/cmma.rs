//! Pipelined tensor-core block-sparse products for block size 128, built on the grouped GEMMs of
//! [`scatter`](crate::scatter) (`gemm_pipelined.rs`: 128 × 128 tiles of 8 planes of 64 × 32,
//! `cp.async` copies `stages` steps of `block_k` ahead, one barrier per stage), whose copy, barrier
//! and tensor-core helpers they reuse; only the operand addressing and the epilogue differ.
//!
//! Why this is a small extension: with `bs = 128` = the tile and the expert-diagonal topology of
//! [`BlockSparseTopology`](crate::BlockSparseTopology) (the only one it builds), row block `rb` of
//! expert `e` holds exactly the `nb = Fp / 128` column blocks of `e`, in order, so nonzero block
//! `(rb, local column block jb)` is block `rb · nb + jb` of the `[nnz, 128, 128]` data (its
//! `row_offsets[rb]` is `rb · nb`). Hence a 128-row tile of the grouped GEMM over the *padded*
//! expert segments is one row block, and
//!
//! | product | orientation | kernel | `m` | `k` | sparse operand |
//! |---|---|---|---|---|---|
//! | SDD  | `transpose` (`w: [E, F, K]`) or not (`w: [E, K, F]`) | forward, same `transpose` | `F` | `K` | the output (`sparse_out`) |
//! | DSD  | `transpose` (`w: [E, M, F]`) or not (`w: [E, F, M]`) | forward, same `transpose` | `M` | `F` | A (`sparse_a`) |
//! | DSᵀD | not (`out: [E, F, M]`) | weight gradient `Aᵀ·B`, A = S, B = d | `F` | `M` | A (`sparse_a`) |
//! | DSᵀD | `transpose` (`out: [E, M, F]`) | weight gradient `Aᵀ·B`, A = d, B = S | `M` | `F` | B (`!sparse_a`) |
//!
//! Padded hidden columns (`F ≤ c < Fp`): the SDD reads no weight there (zero-filled copies) and
//! writes explicit zeros; the DSD bounds its reduction by `F` on both operands, so whatever the
//! sparse data holds in those columns is never read; the DSᵀD writes only the `F` real columns.
//! A `block_k`-deep step never straddles two blocks (`128 % block_k == 0`, and the segments start
//! on multiples of 128). Padded rows are ordinary rows of the padded segments.
//!
//! Requirements (checked by the launcher, which otherwise runs the one-element-per-unit kernels):
//! block size 128, f16/bf16 with cmma, cube barriers with async copies (CUDA), `F` and the dense
//! width multiples of 8 (16-byte vectors).

use cubecl::cmma;
use cubecl::prelude::barrier::{Barrier, copy_async_checked};
use cubecl::prelude::*;

use crate::scatter::gemm::{CMMA_BLOCK_M, CMMA_BLOCK_N, CMMA_PLANE};
use crate::scatter::gemm_pipelined::{commit_and_arrive, issue_rows_tile, issue_w_tile, issue_x_tile, mma_step, plane_layout, wait_stage};

/// The block size the tensor-core kernels run at (= the 128 × 128 tile).
pub const CMMA_SPARSE_BLOCK: usize = 128;

// One tile row (column) block is one sparse row (column) block.
const _: () = assert!(CMMA_BLOCK_M == CMMA_SPARSE_BLOCK && CMMA_BLOCK_N == CMMA_SPARSE_BLOCK);

/// SDD (`sparse_out`) or DSD (`sparse_a`): the forward grouped GEMM `A[seg e] · w[e]ᵀ`
/// (`transpose`, `w: [E, m, k]`) or `A[seg e] · w[e]` (`w: [E, k, m]`) over the padded expert
/// segments (`offsets`, `[E + 1]`), one 128-row block × 128 output columns per cube.
///
/// - `a`: dense `[Tp, k]`, or (`sparse_a`) the sparse data `[nnz, 128, 128]` read as the `[Tp, Fp]`
///   row blocks of the topology, its reduction bounded by `k = F`.
/// - `out`: dense `[Tp, m]`, or (`sparse_out`) the sparse data: output column block `CUBE_POS_Y` of
///   row block `rb` is block `rb · blocks_per_row + CUBE_POS_Y`; columns `≥ m = F` get zeros.
/// - `tiles`: `(expert, first row)` of every row block, grid `(row blocks, column tiles)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn block_sparse_forward_cmma_kernel<F: Float, N: Size>(
    a: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    offsets: &Array<u32>,
    tiles: &Array<u32>,
    out: &mut Array<F>,
    m: usize,
    k: usize,
    blocks_per_row: usize,
    #[comptime] transpose: bool,
    #[comptime] sparse_a: bool,
    #[comptime] sparse_out: bool,
    #[comptime] block_k: usize,
    #[comptime] stages: usize,
    #[comptime] wide: bool,
) {
    let nv = N::value();
    let a_len = comptime!(CMMA_BLOCK_M * (block_k + 8) / nv);
    let b_len = comptime!(if transpose { CMMA_BLOCK_N * (block_k + 8) / nv } else { block_k * (CMMA_BLOCK_N + 8) / nv });

    let tile = CUBE_POS_X as usize;
    let e = tiles[2 * tile] as usize;
    let row0 = tiles[2 * tile + 1] as usize;
    let row_block = row0 / CMMA_SPARSE_BLOCK;
    let row_end = offsets[e + 1] as usize;
    let col0 = CUBE_POS_Y as usize * CMMA_BLOCK_N;
    let tid = UNIT_POS as usize;
    let plane = tid / CMMA_PLANE as usize;
    // The planes share the tile as in the scatter kernels (`plane_layout`).
    let units = comptime!(plane_layout(wide).units);
    let frags_n = comptime!(plane_layout(wide).frags_n);
    let plane_cols = comptime!(plane_layout(wide).plane_cols);
    let plane_row = (plane / plane_cols) * 64;
    let plane_col = (plane % plane_cols) * (16 * frags_n);
    let w_base = e * m * k;

    let mut a_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(stages * a_len), 128usize);
    let mut b_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(stages * b_len), 128usize);
    let bar0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar2 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar3 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);

    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..comptime!(4 * frags_n) {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }

    let steps = (k + block_k - 1) / block_k;
    #[unroll]
    for c in 0..comptime!(stages - 1) {
        if c < steps {
            if sparse_a {
                issue_sparse_row_block_tile::<F, N>(a, &mut a_s, c * a_len, tid, row_block, blocks_per_row, k, c * block_k, block_k, units);
            } else {
                issue_x_tile::<F, N>(a, &mut a_s, c * a_len, tid, row0, row_end, k, c * block_k, block_k, units);
            }
            issue_w_tile::<F, N>(w, &mut b_s, c * b_len, tid, col0, w_base, m, k, c * block_k, transpose, block_k, units);
            commit_and_arrive(c, &bar0, &bar1, &bar2, &bar3);
        }
    }
    let mut c = 0usize;
    while c < steps {
        let s = c % stages;
        wait_stage(s, ((c / stages) % 2) as u32, &bar0, &bar1, &bar2, &bar3);
        sync_cube();
        let next = c + stages - 1;
        if next < steps {
            let sn = next % stages;
            if sparse_a {
                issue_sparse_row_block_tile::<F, N>(a, &mut a_s, sn * a_len, tid, row_block, blocks_per_row, k, next * block_k, block_k, units);
            } else {
                issue_x_tile::<F, N>(a, &mut a_s, sn * a_len, tid, row0, row_end, k, next * block_k, block_k, units);
            }
            issue_w_tile::<F, N>(w, &mut b_s, sn * b_len, tid, col0, w_base, m, k, next * block_k, transpose, block_k, units);
            commit_and_arrive(sn, &bar0, &bar1, &bar2, &bar3);
        }
        mma_step::<F, N>(&a_s, &b_s, s * a_len, s * b_len, plane_row, plane_col, &accs, false, !transpose, block_k, frags_n);
        c += 1;
    }

    let mut stage = SharedMemory::<f32>::new_aligned(comptime!(8 * 256usize), 128usize);
    let lane = tid % CMMA_PLANE as usize;
    let stage_start = plane * 256;
    let out_block = row_block * blocks_per_row + CUBE_POS_Y as usize;
    #[unroll]
    for i in 0..4usize {
        #[unroll]
        for j in 0..frags_n {
            cmma::store(
                &mut stage.slice_mut(stage_start, stage_start + 256),
                &accs[i * frags_n + j],
                16u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_plane();
            #[unroll]
            for t in 0..8usize {
                let idx = lane + t * 32;
                let r = plane_row + i * 16 + idx / 16;
                let cc = plane_col + j * 16 + idx % 16;
                let row = row0 + r;
                let col = col0 + cc;
                if sparse_out {
                    // Block storage holds every column of the block: a padded hidden column is an
                    // explicit zero (its weight copies were zero-filled; written as such anyway).
                    let mut v = F::cast_from(stage[stage_start + idx]);
                    if col >= m {
                        v = F::cast_from(0u32);
                    }
                    out[(out_block * CMMA_SPARSE_BLOCK + r) * CMMA_SPARSE_BLOCK + cc] = v;
                } else if row < row_end && col < m {
                    out[row * m + col] = F::cast_from(stage[stage_start + idx]);
                }
            }
            sync_plane();
        }
    }
}

/// DSᵀD: `dw[e] = A[seg e]ᵀ · B[seg e]` into `dw: [E, m, k]` over the padded expert segments, one
/// 128 × 128 tile per cube (grid `(m tiles, k tiles, E)`); an expert without rows writes zeros.
/// `sparse_a`: A is the sparse data read as `[Tp, Fp]` (`m = F`) and B is dense `[Tp, k]`; else A is
/// dense `[Tp, m]` and B the sparse data (`k = F`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn block_sparse_weight_grad_cmma_kernel<F: Float, N: Size>(
    a: &Array<Vector<F, N>>,
    b: &Array<Vector<F, N>>,
    offsets: &Array<u32>,
    dw: &mut Array<F>,
    m: usize,
    k: usize,
    blocks_per_row: usize,
    #[comptime] sparse_a: bool,
    #[comptime] block_k: usize,
    #[comptime] stages: usize,
    #[comptime] wide: bool,
) {
    let nv = N::value();
    let a_len = comptime!(block_k * (CMMA_BLOCK_M + 8) / nv);
    let b_len = comptime!(block_k * (CMMA_BLOCK_N + 8) / nv);

    let e = CUBE_POS_Z as usize;
    let start = offsets[e] as usize;
    let end = offsets[e + 1] as usize;
    let j0 = CUBE_POS_X as usize * CMMA_BLOCK_M;
    let l0 = CUBE_POS_Y as usize * CMMA_BLOCK_N;
    let tid = UNIT_POS as usize;
    let plane = tid / CMMA_PLANE as usize;
    // The planes share the tile as in the scatter kernels (`plane_layout`).
    let units = comptime!(plane_layout(wide).units);
    let frags_n = comptime!(plane_layout(wide).frags_n);
    let plane_cols = comptime!(plane_layout(wide).plane_cols);
    let plane_row = (plane / plane_cols) * 64;
    let plane_col = (plane % plane_cols) * (16 * frags_n);

    let mut a_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(stages * a_len), 128usize);
    let mut b_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(stages * b_len), 128usize);
    let bar0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar2 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar3 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);

    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..comptime!(4 * frags_n) {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }

    let steps = (end - start + block_k - 1) / block_k;
    #[unroll]
    for c in 0..comptime!(stages - 1) {
        if c < steps {
            let i0 = start + c * block_k;
            if sparse_a {
                issue_sparse_rows_tile::<F, N>(a, &mut a_s, c * a_len, tid, i0, end, j0, m, blocks_per_row, block_k, units);
                issue_rows_tile::<F, N>(b, &mut b_s, c * b_len, tid, i0, end, l0, k, block_k, units);
            } else {
                issue_rows_tile::<F, N>(a, &mut a_s, c * a_len, tid, i0, end, j0, m, block_k, units);
                issue_sparse_rows_tile::<F, N>(b, &mut b_s, c * b_len, tid, i0, end, l0, k, blocks_per_row, block_k, units);
            }
            commit_and_arrive(c, &bar0, &bar1, &bar2, &bar3);
        }
    }
    let mut c = 0usize;
    while c < steps {
        let s = c % stages;
        wait_stage(s, ((c / stages) % 2) as u32, &bar0, &bar1, &bar2, &bar3);
        sync_cube();
        let next = c + stages - 1;
        if next < steps {
            let sn = next % stages;
            let i0 = start + next * block_k;
            if sparse_a {
                issue_sparse_rows_tile::<F, N>(a, &mut a_s, sn * a_len, tid, i0, end, j0, m, blocks_per_row, block_k, units);
                issue_rows_tile::<F, N>(b, &mut b_s, sn * b_len, tid, i0, end, l0, k, block_k, units);
            } else {
                issue_rows_tile::<F, N>(a, &mut a_s, sn * a_len, tid, i0, end, j0, m, block_k, units);
                issue_sparse_rows_tile::<F, N>(b, &mut b_s, sn * b_len, tid, i0, end, l0, k, blocks_per_row, block_k, units);
            }
            commit_and_arrive(sn, &bar0, &bar1, &bar2, &bar3);
        }
        mma_step::<F, N>(&a_s, &b_s, s * a_len, s * b_len, plane_row, plane_col, &accs, true, true, block_k, frags_n);
        c += 1;
    }

    let mut stage = SharedMemory::<f32>::new_aligned(comptime!(8 * 256usize), 128usize);
    let lane = tid % CMMA_PLANE as usize;
    let stage_start = plane * 256;
    #[unroll]
    for r in 0..4usize {
        #[unroll]
        for cc in 0..frags_n {
            cmma::store(
                &mut stage.slice_mut(stage_start, stage_start + 256),
                &accs[r * frags_n + cc],
                16u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_plane();
            #[unroll]
            for t in 0..8usize {
                let idx = lane + t * 32;
                let j = j0 + plane_row + r * 16 + idx / 16;
                let l = l0 + plane_col + cc * 16 + idx % 16;
                if j < m && l < k {
                    dw[(e * m + j) * k + l] = F::cast_from(stage[stage_start + idx]);
                }
            }
            sync_plane();
        }
    }
}

/// The A tile of one DSD step: the 128 rows of row block `row_block`, hidden columns
/// `k0 .. k0 + block_k` (bounded by `ffn`: the padded columns are zero-filled, never read), staged
/// `[row][k]` like [`issue_x_tile`]. The step lies inside column block `k0 / 128`, i.e. inside
/// nonzero block `row_block · blocks_per_row + k0 / 128`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue_sparse_row_block_tile<F: Float, N: Size>(
    s: &Array<Vector<F, N>>,
    a_s: &mut SharedMemory<Vector<F, N>>,
    a_at: usize,
    tid: usize,
    row_block: usize,
    blocks_per_row: usize,
    ffn: usize,
    k0: usize,
    #[comptime] block_k: usize,
    #[comptime] units: usize,
) {
    let nv = N::value();
    let vpr = comptime!(block_k / nv);
    let row_vecs = comptime!((block_k + 8) / nv);
    let bs = CMMA_SPARSE_BLOCK;
    let base = (row_block * blocks_per_row + k0 / bs) * bs * bs + k0 % bs;
    #[unroll]
    for st in 0..comptime!(CMMA_BLOCK_M * block_k / (units * nv)) {
        let q = tid + st * units;
        let r = q / vpr;
        let cv = q % vpr;
        let kk = k0 + cv * nv;
        let mut src = 0usize;
        let mut len = 0usize;
        if kk < ffn {
            src = (base + r * bs + cv * nv) / nv;
            len = 1usize;
        }
        let dst = a_at + r * row_vecs + cv;
        copy_async_checked(&s.slice(src, src + len), &mut a_s.slice_mut(dst, dst + 1), comptime!(nv as u32));
    }
}

/// The sparse operand of one DSᵀD step, like [`issue_rows_tile`]: padded rows `i0 .. i0 + block_k`
/// (bounded by `end`), hidden columns `c0 .. c0 + 128` (bounded by `ffn`), staged `[row][column]`.
/// Rows `i0 ..` lie in row block `i0 / 128` (segments start on multiples of 128 and
/// `128 % block_k == 0`) and the columns in column block `c0 / 128`: one nonzero block.
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue_sparse_rows_tile<F: Float, N: Size>(
    s: &Array<Vector<F, N>>,
    dst_s: &mut SharedMemory<Vector<F, N>>,
    at: usize,
    tid: usize,
    i0: usize,
    end: usize,
    c0: usize,
    ffn: usize,
    blocks_per_row: usize,
    #[comptime] block_k: usize,
    #[comptime] units: usize,
) {
    let nv = N::value();
    let vpr = comptime!(CMMA_BLOCK_M / nv);
    let row_vecs = comptime!((CMMA_BLOCK_M + 8) / nv);
    let bs = CMMA_SPARSE_BLOCK;
    let base = ((i0 / bs) * blocks_per_row + c0 / bs) * bs * bs + (i0 % bs) * bs;
    #[unroll]
    for st in 0..comptime!(CMMA_BLOCK_M * block_k / (units * nv)) {
        let q = tid + st * units;
        let i = q / vpr;
        let cv = q % vpr;
        let row = i0 + i;
        let c = c0 + cv * nv;
        let mut src = 0usize;
        let mut len = 0usize;
        if row < end && c < ffn {
            src = (base + i * bs + cv * nv) / nv;
            len = 1usize;
        }
        let dst = at + i * row_vecs + cv;
        copy_async_checked(&s.slice(src, src + len), &mut dst_s.slice_mut(dst, dst + 1), comptime!(nv as u32));
    }
}
