//! Pipelined tensor-core grouped GEMMs: the same products as
//! [`grouped_matmul_cmma_kernel`](super::grouped_matmul_cmma_kernel) and
//! [`grouped_matmul_weight_grad_cmma_kernel`](super::grouped_matmul_weight_grad_cmma_kernel), with
//! the operand tiles brought into shared memory by asynchronous copies (`cp.async`) several depth
//! steps ahead of the tensor cores.
//!
//! Why: the profile of the single-stage kernels on an H200 (ncu, Mixtral up projection) showed
//! 160 registers per unit, hence one cube (8 planes) per SM, and 83% of issue slots without an
//! eligible plane, the largest stall being the wait for global loads. A register prefetch of one
//! depth step does not cover the global-memory latency with so few planes. Here `stages` depth steps
//! are in flight at once, the copies go global → shared without registers, and a plane waits only
//! for the step it is about to multiply.
//!
//! Protocol, per shared-memory stage `s` (one barrier each, arrival count = units per cube):
//! every unit issues its copies for a step, then `commit_copy_async` (the barrier will also wait for
//! those copies) and `arrive`. Before multiplying step `c` a unit waits on the barrier of stage
//! `c % stages` for that stage's use number `c / stages` (parity), then the cube synchronises once:
//! after that every plane has finished step `c - 1`, so its stage can be refilled with step
//! `c + stages - 1`. Out-of-range vectors are copied with a source length of zero, which fills them
//! with zeros, so edge tiles need no other treatment.
//!
//! Requirements (checked by the launcher, which otherwise runs the single-stage kernels): f16/bf16
//! with cmma, 8-element (16-byte) vectors (`k`, and `m` where `w` is `[E, k, m]`, multiples of 8),
//! and a runtime with cube-level barriers and async copies (CUDA).
//!
//! `manual` (an experiment, selected explicitly, never by default): the same pipeline, but the
//! tensor-core work of a step is `ldmatrix` fragment loads and `mma.sync.m16n8k16` on register
//! arrays ([`mma_step_manual`]) instead of CubeCL's wmma-class `cmma::load` / `cmma::execute`
//! ([`mma_step`]), with the f32 accumulators as plain registers. Why: the wmma path tops out at
//! ~235–250 TFLOP/s bf16 on an H200 at Mixtral shapes (cuBLAS ~800). With `mma.sync` the kernel
//! chooses the fragment loads itself — one `ldmatrix.x4` per 16 × 16 operand, free of bank
//! conflicts with the padded strides — and their order, as hand-written Ampere-style kernels do,
//! instead of leaving them to ptxas' lowering of `wmma.load`; the experiment is whether that
//! matters on Hopper (whose full rate needs `wgmma`, which neither path uses). Needs the runtime's
//! manual MMA (m16n8k16, f16/bf16 → f32) and `ldmatrix` (CUDA sm_80+), checked by the launcher.

use cubecl::cmma;
use cubecl::prelude::barrier::{Barrier, copy_async_checked};
use cubecl::prelude::*;

use super::gemm::{CMMA_BLOCK_M, CMMA_BLOCK_N, CMMA_PLANE};

/// One lane's registers of an `mma.sync` operand or accumulator: 32-bit registers as 2-element
/// vectors (2 × f16/bf16 for A and B, as `ldmatrix` and `mma` pack them; 2 × f32 for C/D, the two
/// adjacent columns a lane holds). See [`mma_step_manual`].
pub(crate) type MmaRegs<E> = Array<Vector<E, Const<2>>>;

/// How a cube's planes share its 128 × 128 tile (see [`plane_layout`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlaneLayout {
    /// Units per cube (32 per plane).
    pub units: usize,
    /// 16 × 16 fragments per plane along the tile's columns (4 along its rows).
    pub frags_n: usize,
    /// Planes side by side along the tile's columns.
    pub plane_cols: usize,
}

impl PlaneLayout {
    /// The cube dimension the kernels are launched with.
    pub fn cube_dim(self) -> CubeDim {
        CubeDim::new_1d(self.units as u32)
    }
}

/// Default: 8 planes (256 units) as 2 × 4, each 64 × 32 (4 × 2 fragments). Wide: 4 planes (128
/// units) as 2 × 2, each 64 × 64 (4 × 4 fragments). Why the wide one exists: per 16-deep step a
/// plane of the default layout loads 6 fragments from shared memory for 8 products, the wide one 8
/// for 16 — more independent tensor-core work per load for the scheduler to overlap, at the cost of
/// twice the accumulator registers per unit (half the units per cube).
pub(crate) const fn plane_layout(wide: bool) -> PlaneLayout {
    if wide { PlaneLayout { units: 128, frags_n: 4, plane_cols: 2 } } else { PlaneLayout { units: 256, frags_n: 2, plane_cols: 4 } }
}

// `issue_rows_tile` stages both weight-gradient operands with the same 128-column tile.
const _: () = assert!(CMMA_BLOCK_M == CMMA_BLOCK_N);

/// `out = x[seg e] · w[e]ᵀ` (`transpose`, `w: [E, m, k]`) or `x[seg e] · w[e]` (`w: [E, k, m]`), one
/// 128 × 128 tile per cube, `block_k` (32 or 64) deep per step, `stages` (2–4) steps in flight;
/// `manual`: the tensor-core work by `ldmatrix` + `mma.sync` ([`mma_step_manual`]).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn grouped_matmul_cmma_pipelined_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    offsets: &Array<u32>,
    tiles: &Array<u32>,
    out: &mut Array<F>,
    m: usize,
    k: usize,
    group: usize,
    #[comptime] transpose: bool,
    #[comptime] block_k: usize,
    #[comptime] stages: usize,
    #[comptime] wide: bool,
    #[comptime] manual: bool,
) {
    let nv = N::value();
    let units = comptime!(plane_layout(wide).units);
    let frags_n = comptime!(plane_layout(wide).frags_n);
    let plane_cols = comptime!(plane_layout(wide).plane_cols);
    let a_len = comptime!(CMMA_BLOCK_M * (block_k + 8) / nv);
    let b_len = comptime!(if transpose { CMMA_BLOCK_N * (block_k + 8) / nv } else { block_k * (CMMA_BLOCK_N + 8) / nv });

    let (tile, col_tile) = grouped_tile(group);
    let e = tiles[2 * tile] as usize;
    let row0 = tiles[2 * tile + 1] as usize;
    let row_end = offsets[e + 1] as usize;
    let col0 = col_tile * CMMA_BLOCK_N;
    let tid = UNIT_POS as usize;
    let plane = tid / CMMA_PLANE as usize;
    let plane_row = (plane / plane_cols) * 64;
    let plane_col = (plane % plane_cols) * (16 * frags_n);
    let w_base = e * m * k;

    let mut a_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(stages * a_len), 128usize);
    let mut b_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(stages * b_len), 128usize);
    let bar0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar2 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar3 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);

    // The accumulators of one path; the other path's sequence stays empty (no registers).
    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..comptime!(if manual { 0 } else { 4 * frags_n }) {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    let mut mma_accs = mma_accumulators(comptime!(if manual { 8 * frags_n } else { 0 }));

    let steps = (k + block_k - 1) / block_k;
    #[unroll]
    for c in 0..comptime!(stages - 1) {
        if c < steps {
            issue_forward_step::<F, N>(
                x, w, &mut a_s, &mut b_s, c * a_len, c * b_len, tid, row0, row_end, col0, w_base, m, k, c * block_k, transpose,
                block_k, units,
            );
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
            issue_forward_step::<F, N>(
                x,
                w,
                &mut a_s,
                &mut b_s,
                sn * a_len,
                sn * b_len,
                tid,
                row0,
                row_end,
                col0,
                w_base,
                m,
                k,
                next * block_k,
                transpose,
                block_k,
                units,
            );
            commit_and_arrive(sn, &bar0, &bar1, &bar2, &bar3);
        }
        if manual {
            mma_step_manual::<F, N>(&a_s, &b_s, s * a_len, s * b_len, plane_row, plane_col, &mut mma_accs, false, !transpose, block_k, frags_n);
        } else {
            mma_step::<F, N>(&a_s, &b_s, s * a_len, s * b_len, plane_row, plane_col, &accs, false, !transpose, block_k, frags_n);
        }
        c += 1;
    }

    let mut stage = SharedMemory::<f32>::new_aligned(comptime!(8 * 256usize), 128usize);
    let lane = tid % CMMA_PLANE as usize;
    let stage_start = plane * 256;
    #[unroll]
    for i in 0..4usize {
        #[unroll]
        for j in 0..frags_n {
            stage_accumulator(&mut stage, stage_start, lane, &accs, &mma_accs, comptime!(i * frags_n + j), manual);
            sync_plane();
            #[unroll]
            for t in 0..8usize {
                let idx = lane + t * 32;
                let row = row0 + plane_row + i * 16 + idx / 16;
                let col = col0 + plane_col + j * 16 + idx % 16;
                if row < row_end && col < m {
                    out[row * m + col] = F::cast_from(stage[stage_start + idx]);
                }
            }
            sync_plane();
        }
    }
}

/// `dw[e] = dy[seg e]ᵀ · x[seg e]` into `dw: [E, m, k]`, one 128 × 128 tile of `dw[e]` per cube
/// (grid `(m tiles, k tiles, E)`), `block_k` segment rows per step, `stages` steps in flight; an
/// expert without rows writes zeros. `manual` as for [`grouped_matmul_cmma_pipelined_kernel`].
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn grouped_matmul_weight_grad_cmma_pipelined_kernel<F: Float, N: Size>(
    dy: &Array<Vector<F, N>>,
    x: &Array<Vector<F, N>>,
    offsets: &Array<u32>,
    dw: &mut Array<F>,
    m: usize,
    k: usize,
    group: usize,
    #[comptime] block_k: usize,
    #[comptime] stages: usize,
    #[comptime] wide: bool,
    #[comptime] manual: bool,
) {
    let nv = N::value();
    let units = comptime!(plane_layout(wide).units);
    let frags_n = comptime!(plane_layout(wide).frags_n);
    let plane_cols = comptime!(plane_layout(wide).plane_cols);
    let a_len = comptime!(block_k * (CMMA_BLOCK_M + 8) / nv);
    let b_len = comptime!(block_k * (CMMA_BLOCK_N + 8) / nv);

    let e = CUBE_POS_Z as usize;
    let start = offsets[e] as usize;
    let end = offsets[e + 1] as usize;
    let (j_tile, l_tile) = grouped_tile(group);
    let j0 = j_tile * CMMA_BLOCK_M;
    let l0 = l_tile * CMMA_BLOCK_N;
    let tid = UNIT_POS as usize;
    let plane = tid / CMMA_PLANE as usize;
    let plane_row = (plane / plane_cols) * 64;
    let plane_col = (plane % plane_cols) * (16 * frags_n);

    let mut a_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(stages * a_len), 128usize);
    let mut b_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(stages * b_len), 128usize);
    let bar0 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar1 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar2 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);
    let bar3 = Barrier::shared(CUBE_DIM, UNIT_POS == 0);

    // The accumulators of one path; the other path's sequence stays empty (no registers).
    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..comptime!(if manual { 0 } else { 4 * frags_n }) {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    let mut mma_accs = mma_accumulators(comptime!(if manual { 8 * frags_n } else { 0 }));

    let steps = (end - start + block_k - 1) / block_k;
    #[unroll]
    for c in 0..comptime!(stages - 1) {
        if c < steps {
            issue_weight_grad_step::<F, N>(dy, x, &mut a_s, &mut b_s, c * a_len, c * b_len, tid, start + c * block_k, end, j0, l0, m, k, block_k, units);
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
            issue_weight_grad_step::<F, N>(
                dy,
                x,
                &mut a_s,
                &mut b_s,
                sn * a_len,
                sn * b_len,
                tid,
                start + next * block_k,
                end,
                j0,
                l0,
                m,
                k,
                block_k,
                units,
            );
            commit_and_arrive(sn, &bar0, &bar1, &bar2, &bar3);
        }
        if manual {
            mma_step_manual::<F, N>(&a_s, &b_s, s * a_len, s * b_len, plane_row, plane_col, &mut mma_accs, true, true, block_k, frags_n);
        } else {
            mma_step::<F, N>(&a_s, &b_s, s * a_len, s * b_len, plane_row, plane_col, &accs, true, true, block_k, frags_n);
        }
        c += 1;
    }

    let mut stage = SharedMemory::<f32>::new_aligned(comptime!(8 * 256usize), 128usize);
    let lane = tid % CMMA_PLANE as usize;
    let stage_start = plane * 256;
    #[unroll]
    for r in 0..4usize {
        #[unroll]
        for cc in 0..frags_n {
            stage_accumulator(&mut stage, stage_start, lane, &accs, &mma_accs, comptime!(r * frags_n + cc), manual);
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

/// The `(x, y)` tile of the cube's `(x, y)` grid this cube computes, when cubes — started in order
/// of `CUBE_POS_Y · CUBE_COUNT_X + CUBE_POS_X` — walk the tiles in groups of `group` x tiles (row
/// tiles of the output), column by column within a group (`1 ≤ group ≤ CUBE_COUNT_X`;
/// `CUBE_COUNT_X` is the launch order itself).
///
/// Why: in launch order the cubes resident at one time (~260 on an H100/H200) cover one or two
/// column tiles and every row tile, so each step streams the whole row operand (the tokens, 256 MiB
/// at T = 16384) from memory once per column tile, far more than the L2 cache holds. In groups of
/// 16 the resident cubes share 16 row tiles and ~16 column tiles, and most operand loads hit L2.
#[cube]
pub(crate) fn grouped_tile(group: usize) -> (usize, usize) {
    let gx = CUBE_COUNT_X as usize;
    let gy = CUBE_COUNT_Y as usize;
    let pid = CUBE_POS_Y as usize * gx + CUBE_POS_X as usize;
    let per_group = group * gy;
    let first = (pid / per_group) * group;
    let left = gx - first;
    let size = select(left < group, left, group);
    let r = pid % per_group;
    (first + r % size, r / size)
}

/// Makes the calling unit's copies so far part of stage `s`'s barrier phase, then arrives on it.
/// The stage is a runtime value (uniform over the cube): one barrier per stage, picked by branch.
#[cube]
pub(crate) fn commit_and_arrive(s: usize, bar0: &Barrier, bar1: &Barrier, bar2: &Barrier, bar3: &Barrier) {
    if s == 0 {
        bar0.commit_copy_async();
        bar0.arrive();
    } else if s == 1 {
        bar1.commit_copy_async();
        bar1.arrive();
    } else if s == 2 {
        bar2.commit_copy_async();
        bar2.arrive();
    } else {
        bar3.commit_copy_async();
        bar3.arrive();
    }
}

/// Waits until stage `s`'s barrier completes the phase of the given parity (its copies have landed).
#[cube]
pub(crate) fn wait_stage(s: usize, parity: u32, bar0: &Barrier, bar1: &Barrier, bar2: &Barrier, bar3: &Barrier) {
    if s == 0 {
        bar0.wait_parity(parity);
    } else if s == 1 {
        bar1.wait_parity(parity);
    } else if s == 2 {
        bar2.wait_parity(parity);
    } else {
        bar3.wait_parity(parity);
    }
}

/// Issues the asynchronous copies of one depth step (`k0 .. k0 + block_k`) of the forward kernel's
/// operands into the stage at `a_at` / `b_at` (vector offsets): `x` rows as a row-major
/// `128 × block_k` tile ([`issue_x_tile`]), `w` as `128 × block_k` (`transpose`, contiguous along k)
/// or `block_k × 128` (contiguous along m) ([`issue_w_tile`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue_forward_step<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    a_s: &mut SharedMemory<Vector<F, N>>,
    b_s: &mut SharedMemory<Vector<F, N>>,
    a_at: usize,
    b_at: usize,
    tid: usize,
    row0: usize,
    row_end: usize,
    col0: usize,
    w_base: usize,
    m: usize,
    k: usize,
    k0: usize,
    #[comptime] transpose: bool,
    #[comptime] block_k: usize,
    #[comptime] units: usize,
) {
    issue_x_tile::<F, N>(x, a_s, a_at, tid, row0, row_end, k, k0, block_k, units);
    issue_w_tile::<F, N>(w, b_s, b_at, tid, col0, w_base, m, k, k0, transpose, block_k, units);
}

/// The A half of [`issue_forward_step`]: rows `row0 ..` (bounded by `row_end`) of `x: [rows, k]`,
/// columns `k0 .. k0 + block_k`, staged `[row][k]`. Row strides in shared memory are padded by 8
/// elements against bank conflicts.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn issue_x_tile<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    a_s: &mut SharedMemory<Vector<F, N>>,
    a_at: usize,
    tid: usize,
    row0: usize,
    row_end: usize,
    k: usize,
    k0: usize,
    #[comptime] block_k: usize,
    #[comptime] units: usize,
) {
    let nv = N::value();
    let vpr = comptime!(block_k / nv);
    let row_vecs = comptime!((block_k + 8) / nv);
    #[unroll]
    for s in 0..comptime!(CMMA_BLOCK_M * block_k / (units * nv)) {
        let q = tid + s * units;
        let r = q / vpr;
        let cv = q % vpr;
        let row = row0 + r;
        let kk = k0 + cv * nv;
        let mut src = 0usize;
        let mut len = 0usize;
        if row < row_end && kk < k {
            src = (row * k + kk) / nv;
            len = 1usize;
        }
        let dst = a_at + r * row_vecs + cv;
        copy_async_checked(&x.slice(src, src + len), &mut a_s.slice_mut(dst, dst + 1), comptime!(nv as u32));
    }
}

/// The B half of [`issue_forward_step`]: columns `col0 ..` (bounded by `m`) of `w[e]` (at element
/// `w_base`), depth `k0 .. k0 + block_k`, staged `[col][k]` (`transpose`, `w[e]: [m, k]`) or
/// `[k][col]` (`w[e]: [k, m]`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn issue_w_tile<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    b_s: &mut SharedMemory<Vector<F, N>>,
    b_at: usize,
    tid: usize,
    col0: usize,
    w_base: usize,
    m: usize,
    k: usize,
    k0: usize,
    #[comptime] transpose: bool,
    #[comptime] block_k: usize,
    #[comptime] units: usize,
) {
    let nv = N::value();
    let vpr = comptime!(block_k / nv);
    let row_vecs = comptime!((block_k + 8) / nv);
    if transpose {
        #[unroll]
        for s in 0..comptime!(CMMA_BLOCK_N * block_k / (units * nv)) {
            let q = tid + s * units;
            let c = q / vpr;
            let cv = q % vpr;
            let col = col0 + c;
            let kk = k0 + cv * nv;
            let mut src = 0usize;
            let mut len = 0usize;
            if col < m && kk < k {
                src = (w_base + col * k + kk) / nv;
                len = 1usize;
            }
            let dst = b_at + c * row_vecs + cv;
            copy_async_checked(&w.slice(src, src + len), &mut b_s.slice_mut(dst, dst + 1), comptime!(nv as u32));
        }
    } else {
        let wide_vpr = comptime!(CMMA_BLOCK_N / nv);
        let wide_row_vecs = comptime!((CMMA_BLOCK_N + 8) / nv);
        #[unroll]
        for s in 0..comptime!(CMMA_BLOCK_N * block_k / (units * nv)) {
            let q = tid + s * units;
            let l = q / wide_vpr;
            let cv = q % wide_vpr;
            let col = col0 + cv * nv;
            let kk = k0 + l;
            let mut src = 0usize;
            let mut len = 0usize;
            if col < m && kk < k {
                src = (w_base + kk * m + col) / nv;
                len = 1usize;
            }
            let dst = b_at + l * wide_row_vecs + cv;
            copy_async_checked(&w.slice(src, src + len), &mut b_s.slice_mut(dst, dst + 1), comptime!(nv as u32));
        }
    }
}

/// Issues the copies of one step of the weight-gradient kernel: segment rows `i0 .. i0 + block_k`
/// (bounded by `end`) of `dy` (columns `j0 ..`, width `m`) and `x` (columns `l0 ..`, width `k`), both
/// staged `[segment row][column]` ([`issue_rows_tile`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue_weight_grad_step<F: Float, N: Size>(
    dy: &Array<Vector<F, N>>,
    x: &Array<Vector<F, N>>,
    a_s: &mut SharedMemory<Vector<F, N>>,
    b_s: &mut SharedMemory<Vector<F, N>>,
    a_at: usize,
    b_at: usize,
    tid: usize,
    i0: usize,
    end: usize,
    j0: usize,
    l0: usize,
    m: usize,
    k: usize,
    #[comptime] block_k: usize,
    #[comptime] units: usize,
) {
    issue_rows_tile::<F, N>(dy, a_s, a_at, tid, i0, end, j0, m, block_k, units);
    issue_rows_tile::<F, N>(x, b_s, b_at, tid, i0, end, l0, k, block_k, units);
}

/// One operand of [`issue_weight_grad_step`]: rows `i0 .. i0 + block_k` (bounded by `end`) of a
/// row-major `[rows, width]` matrix, columns `c0 .. c0 + 128` (bounded by `width`), staged
/// `[row][column]` with the row stride padded by 8 elements.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn issue_rows_tile<F: Float, N: Size>(
    src_mat: &Array<Vector<F, N>>,
    dst_s: &mut SharedMemory<Vector<F, N>>,
    at: usize,
    tid: usize,
    i0: usize,
    end: usize,
    c0: usize,
    width: usize,
    #[comptime] block_k: usize,
    #[comptime] units: usize,
) {
    let nv = N::value();
    let vpr = comptime!(CMMA_BLOCK_M / nv);
    let row_vecs = comptime!((CMMA_BLOCK_M + 8) / nv);
    #[unroll]
    for s in 0..comptime!(CMMA_BLOCK_M * block_k / (units * nv)) {
        let q = tid + s * units;
        let i = q / vpr;
        let cv = q % vpr;
        let row = i0 + i;
        let c = c0 + cv * nv;
        let mut src = 0usize;
        let mut len = 0usize;
        if row < end && c < width {
            src = (row * width + c) / nv;
            len = 1usize;
        }
        let dst = at + i * row_vecs + cv;
        copy_async_checked(&src_mat.slice(src, src + len), &mut dst_s.slice_mut(dst, dst + 1), comptime!(nv as u32));
    }
}

/// The tensor-core work of one step on the stage at `a_at` / `b_at`: each plane multiplies its
/// 64 × `16 · frags_n` block (4 × `frags_n` fragments; `frags_n` is 2, or 4 for the wide layout,
/// see [`plane_layout`]). `a_kmajor`: A staged `[k][row]` (a column-major fragment, the
/// weight gradient's `dyᵀ`) instead of `[row][k]`; `b_kmajor`: B staged `[k][col]` (row-major
/// fragment) instead of `[col][k]`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mma_step<F: Float, N: Size>(
    a_s: &SharedMemory<Vector<F, N>>,
    b_s: &SharedMemory<Vector<F, N>>,
    a_at: usize,
    b_at: usize,
    plane_row: usize,
    plane_col: usize,
    accs: &Sequence<cmma::Matrix<f32>>,
    #[comptime] a_kmajor: bool,
    #[comptime] b_kmajor: bool,
    #[comptime] block_k: usize,
    #[comptime] frags_n: usize,
) {
    let nv = N::value();
    let a_stride = comptime!(if a_kmajor { CMMA_BLOCK_M + 8 } else { block_k + 8 });
    let b_stride = comptime!(if b_kmajor { CMMA_BLOCK_N + 8 } else { block_k + 8 });
    let a_layout = comptime!(if a_kmajor { cmma::MatrixLayout::ColMajor } else { cmma::MatrixLayout::RowMajor });
    let b_layout = comptime!(if b_kmajor { cmma::MatrixLayout::RowMajor } else { cmma::MatrixLayout::ColMajor });
    #[unroll]
    for ks in 0..comptime!(block_k / 16) {
        let mut a_frags = Sequence::<cmma::Matrix<F>>::new();
        #[unroll]
        for i in 0..4usize {
            let a = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, 16usize, 16usize, 16usize, a_layout) };
            let first = if a_kmajor {
                (ks * 16 * a_stride + plane_row + i * 16) / nv
            } else {
                ((plane_row + i * 16) * a_stride + ks * 16) / nv
            };
            let start = a_at + first;
            cmma::load(&a, &a_s.slice(start, start + (15 * a_stride + 16) / nv), a_stride as u32);
            a_frags.push(a);
        }
        #[unroll]
        for j in 0..frags_n {
            let b = unsafe { cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, 16usize, 16usize, 16usize, b_layout) };
            let first = if b_kmajor {
                (ks * 16 * b_stride + plane_col + j * 16) / nv
            } else {
                ((plane_col + j * 16) * b_stride + ks * 16) / nv
            };
            let start = b_at + first;
            cmma::load(&b, &b_s.slice(start, start + (15 * b_stride + 16) / nv), b_stride as u32);
            #[unroll]
            for i in 0..4usize {
                let acc = &accs[i * frags_n + j];
                cmma::execute::<F, F, f32, f32>(&a_frags[i], &b, acc, acc);
            }
        }
    }
}

/// Zeroed accumulator registers for [`mma_step_manual`]: `count` 16 × 8 f32 tiles (two per 16 × 16
/// fragment of [`mma_step`], the left one first).
#[cube]
fn mma_accumulators(#[comptime] count: usize) -> Sequence<MmaRegs<f32>> {
    let mut accs = Sequence::<MmaRegs<f32>>::new();
    #[unroll]
    for _ in 0..count {
        let mut regs = MmaRegs::<f32>::new(2usize);
        regs[0] = Vector::<f32, Const<2>>::new(0.0);
        regs[1] = Vector::<f32, Const<2>>::new(0.0);
        accs.push(regs);
    }
    accs
}

/// [`mma_step`] by hand: the same products on the same staged tiles (same padded strides, same
/// `a_kmajor` / `b_kmajor` orientations), each plane's 64 × `16 · frags_n` block as 4 × `2 · frags_n`
/// `mma.sync.m16n8k16` tiles (f16/bf16 → f32) whose accumulators stay in registers (`accs`, from
/// [`mma_accumulators`]: tile `(i, n8)` at `i · 2 · frags_n + n8`). Per 16-deep slice a plane issues
/// 4 `ldmatrix.x4` for A (one 16 × 16 fragment each) and `frags_n` for B (two 16 × 8 tiles each).
///
/// Register layouts, from the CUDA code CubeCL 0.10 generates (cubecl-cpp `cuda/ptx/mma.rs`,
/// `cuda/mma/ptx_wmma_compiler.rs`, `cuda/processors.rs`) and the PTX ISA fragment tables for
/// `mma.m16n8k16` (g = lane / 4, t = lane % 4; "x..x+1" = one 32-bit register, lower column first):
///
/// - `load_matrix(row, _, 4, trans)` is `ldmatrix.sync.aligned.m8n8.x4[.trans].shared::cta.b16
///   {r0, r1, r2, r3}, [row]` into `regs[0..4]` (each a 2 × 16-bit vector). Lane L passes the
///   address of row L % 8 of 8 × 8 matrix q = L / 8 (16 contiguous bytes). Without `.trans` lane
///   L's `r_q` is matrix q's row g, columns 2t, 2t + 1; with `.trans` it is the stored rows 2t and
///   2t + 1 of column g (the row g of the transposed matrix).
/// - `execute_inplace(a, b, c)` is `mma.sync.aligned.m16n8k16.row.col.f32.{bf16|f16}...f32` on
///   `a[0..4]`, `b[0..2]` (as u32) and `c` (as 4 f32, in and out):
///   A (16 × 16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
///   B (16 × 8, k × n): b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g];
///   C/D (16 × 8 f32): c[0] = (C[g][2t], C[g][2t+1]), c[1] = (C[g+8][2t], C[g+8][2t+1]).
///
/// Hence matrix q of an A load must be the 8 × 8 block at (rows 8·(q%2), k 8·(q/2)), and matrix q of
/// a B load (k × 16 columns) the block at (k 8·(q%2), columns 8·(q/2)): registers 0, 1 are then
/// b0, b1 of the left 16 × 8 tile and 2, 3 those of the right one. The row each lane addresses
/// (q = lane / 8, r = lane % 8; element offsets in the 16 × 16 block, `stride` = padded row stride):
///
/// | staged      | lane's 16-byte row                    | `.trans` |
/// |-------------|---------------------------------------|----------|
/// | A `[row][k]` | `(8·(q%2) + r) · stride + 8·(q/2)`   | no       |
/// | A `[k][row]` | `(8·(q/2) + r) · stride + 8·(q%2)`   | yes      |
/// | B `[col][k]` | `(8·(q/2) + r) · stride + 8·(q%2)`   | no       |
/// | B `[k][col]` | `(8·(q%2) + r) · stride + 8·(q/2)`   | yes      |
///
/// Checked by hand for lane 13 (q = 1, r = 5, g = 3, t = 1), which must end with a1 = A[11][2..3]
/// and b1 = B[10..11][3] of the left tile: A `[row][k]`: lane 13 addresses A row 13, k 0; its r1 is
/// matrix 1's row 3 (addressed by lane 11: A row 11), columns 2, 3 → A[11][2..3]. A `[k][row]`:
/// lane 13 addresses k 5, rows 8..15; its r1 with `.trans` is matrix 1's stored rows 2, 3 (k 2, 3)
/// at column 3 (row 8 + 3) → A[11][2..3]. B `[col][k]`: lane 13 addresses column 5, k 8..15; r1 is
/// matrix 1's row 3 (column 3), k 8 + 2, 8 + 3 → B[10..11][3]. B `[k][col]`: lane 13 addresses k 13,
/// columns 0..7; r1 with `.trans` is matrix 1's stored rows 2, 3 (k 10, 11) at column 3 → B[10..11][3].
///
/// Every addressed row starts on a multiple of 8 elements (16 bytes, as `ldmatrix` needs; the stage
/// buffers are 128-byte aligned), and with the strides padded by 8 elements (80, 144 or 272 bytes)
/// the 8 rows of one matrix fall on distinct 4-bank groups: the loads are free of bank conflicts.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mma_step_manual<F: Float, N: Size>(
    a_s: &SharedMemory<Vector<F, N>>,
    b_s: &SharedMemory<Vector<F, N>>,
    a_at: usize,
    b_at: usize,
    plane_row: usize,
    plane_col: usize,
    accs: &mut Sequence<MmaRegs<f32>>,
    #[comptime] a_kmajor: bool,
    #[comptime] b_kmajor: bool,
    #[comptime] block_k: usize,
    #[comptime] frags_n: usize,
) {
    let nv = N::value();
    let a_stride = comptime!(if a_kmajor { CMMA_BLOCK_M + 8 } else { block_k + 8 });
    let b_stride = comptime!(if b_kmajor { CMMA_BLOCK_N + 8 } else { block_k + 8 });
    let def = cmma::MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    // The lane in the plane, as the kernels lay planes out (32 consecutive units of a 1-D cube);
    // not `UNIT_POS_PLANE`, which CUDA computes as `% warpSize`, a runtime value.
    let lane = UNIT_POS as usize % CMMA_PLANE as usize;
    let q = lane / 8;
    let r = lane % 8;
    // The lane's row in each 16 × 16 block (table above), the same for every block of the step.
    let a_lane = if a_kmajor { (8 * (q / 2) + r) * a_stride + 8 * (q % 2) } else { (8 * (q % 2) + r) * a_stride + 8 * (q / 2) };
    let b_lane = if b_kmajor { (8 * (q % 2) + r) * b_stride + 8 * (q / 2) } else { (8 * (q / 2) + r) * b_stride + 8 * (q % 2) };
    #[unroll]
    for ks in 0..comptime!(block_k / 16) {
        let mut a_frags = Sequence::<MmaRegs<F>>::new();
        #[unroll]
        for i in 0..4usize {
            let first = if a_kmajor { ks * 16 * a_stride + plane_row + i * 16 } else { (plane_row + i * 16) * a_stride + ks * 16 };
            let start = a_at + (first + a_lane) / nv;
            a_frags.push(def.load_matrix::<Vector<F, N>, Const<2>>(&a_s.slice(start, start + 1), cmma::MatrixIdent::A, 4usize, a_kmajor));
        }
        #[unroll]
        for j in 0..frags_n {
            let first = if b_kmajor { ks * 16 * b_stride + plane_col + j * 16 } else { (plane_col + j * 16) * b_stride + ks * 16 };
            let start = b_at + (first + b_lane) / nv;
            let b = def.load_matrix::<Vector<F, N>, Const<2>>(&b_s.slice(start, start + 1), cmma::MatrixIdent::B, 4usize, b_kmajor);
            // The mma takes B as 2 registers per 16 × 8 tile (copies between registers: free).
            let mut left = MmaRegs::<F>::new(2usize);
            let mut right = MmaRegs::<F>::new(2usize);
            left[0] = b[0];
            left[1] = b[1];
            right[0] = b[2];
            right[1] = b[3];
            #[unroll]
            for i in 0..4usize {
                let at = comptime!(2 * (i * frags_n + j));
                def.execute_inplace(&a_frags[i], &left, accs.index_mut(at));
                def.execute_inplace(&a_frags[i], &right, accs.index_mut(at + 1));
            }
        }
    }
}

/// Writes 16 × 16 accumulator tile `tile` (of [`mma_step`]'s `accs`, or with `manual` of
/// [`mma_step_manual`]'s `mma_accs`) row-major into `stage[at .. at + 256]`: the epilogue of both
/// pipelined kernels copies it from there to global memory with its bounds checks.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_accumulator(
    stage: &mut SharedMemory<f32>,
    at: usize,
    lane: usize,
    accs: &Sequence<cmma::Matrix<f32>>,
    mma_accs: &Sequence<MmaRegs<f32>>,
    #[comptime] tile: usize,
    #[comptime] manual: bool,
) {
    if manual {
        stage_mma_tile(stage, at, lane, &mma_accs[comptime!(2 * tile)], &mma_accs[comptime!(2 * tile + 1)]);
    } else {
        cmma::store(&mut stage.slice_mut(at, at + 256), &accs[tile], 16u32, cmma::MatrixLayout::RowMajor);
    }
}

/// Writes one 16 × 16 accumulator tile of [`mma_step_manual`] (its 16 × 8 halves `left` and
/// `right`) row-major into `stage[at .. at + 256]`, as [`cmma::store`] does for the wmma path, so
/// the epilogue's bounded copy to global memory is shared by both paths.
#[cube]
fn stage_mma_tile(stage: &mut SharedMemory<f32>, at: usize, lane: usize, left: &MmaRegs<f32>, right: &MmaRegs<f32>) {
    // C/D fragment: registers 0 = row g, columns 2t and 2t + 1; registers 1 = row g + 8, the same.
    let top = at + (lane / 4) * 16 + (lane % 4) * 2;
    let lt = left[0];
    let lb = left[1];
    let rt = right[0];
    let rb = right[1];
    stage[top] = lt[0];
    stage[top + 1] = lt[1];
    stage[top + 8] = rt[0];
    stage[top + 9] = rt[1];
    stage[top + 128] = lb[0];
    stage[top + 129] = lb[1];
    stage[top + 136] = rb[0];
    stage[top + 137] = rb[1];
}
