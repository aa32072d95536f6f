//! Tiled grouped GEMM kernels: each cube computes one output tile of one expert segment.
//!
//! The grid is `(row tiles over all segments, column tiles)`. Row tile `t` reads its expert and first
//! row from a host-built table (`tiles[2t] = expert`, `tiles[2t + 1] = first row`), so empty experts
//! get no tile at all and a tile never straddles two experts; the tile's last row is bounded by the
//! expert's segment end `offsets[e + 1]`. Every load and store is bounds-checked, so rows, `m` and
//! `k` need not be multiples of the tile sizes (out-of-range operands are read as zero). Because
//! of that the kernels are launched unchecked: CubeCL's per-access bounds checks would only repeat
//! these tests in the inner loops.
//!
//! - [`grouped_matmul_tiled_kernel`]: shared-memory tiling for any float type, operands converted to
//!   f32 on their way to shared memory, f32 accumulation (a 4×4 register block per unit).
//! - [`grouped_matmul_cmma_kernel`]: tensor cores (`cmma`, 16×16×16 fragments) for f16/bf16 operands
//!   with f32 accumulators; operands are staged in shared memory in their storage type with vector
//!   loads of `N` elements.

use cubecl::cmma;
use cubecl::prelude::*;

/// Rows of one output tile of the shared-memory kernel.
pub const TILED_BLOCK_M: usize = 64;
/// Columns of one output tile of the shared-memory kernel.
pub const TILED_BLOCK_N: usize = 64;
/// Reduction depth staged per step by the shared-memory kernel.
pub const TILED_BLOCK_K: usize = 16;
/// Units per cube of the shared-memory kernel (16 × 16, each owning a 4 × 4 block of outputs).
pub const TILED_UNITS: u32 = 256;

/// Rows of one output tile of the tensor-core kernel.
pub const CMMA_BLOCK_M: usize = 128;
/// Columns of one output tile of the tensor-core kernel.
pub const CMMA_BLOCK_N: usize = 128;
/// Reduction depth staged per step by the tensor-core kernel.
pub const CMMA_BLOCK_K: usize = 32;
/// Units per cube of the tensor-core kernel: 8 planes of 32, laid out 2 × 4 over the tile, each
/// owning 64 × 32 outputs as 4 × 2 fragments.
pub const CMMA_UNITS: u32 = 256;
/// The plane (warp) width the tensor-core kernel's layout assumes.
pub const CMMA_PLANE: u32 = 32;

/// `out[i, j] = Σ_l x[i, l] · w[e, j, l]` (`transpose`, `w: [E, m, k]`) or `Σ_l x[i, l] · w[e, l, j]`
/// (`w: [E, k, m]`) for the rows `i` of expert `e`'s segment, one 64 × 64 tile per cube.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn grouped_matmul_tiled_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    offsets: &Array<u32>,
    tiles: &Array<u32>,
    out: &mut Array<F>,
    m: usize,
    k: usize,
    #[comptime] transpose: bool,
) {
    let tile = CUBE_POS_X as usize;
    let e = tiles[2 * tile] as usize;
    let row0 = tiles[2 * tile + 1] as usize;
    let row_end = offsets[e + 1] as usize;
    let col0 = CUBE_POS_Y as usize * TILED_BLOCK_N;
    let tid = UNIT_POS as usize;
    let tx = tid % 16;
    let ty = tid / 16;

    // a_s[r][l] and b_s[l][c]: row-major, f32 whatever the storage type.
    let mut a_s = SharedMemory::<f32>::new(TILED_BLOCK_M * TILED_BLOCK_K);
    let mut b_s = SharedMemory::<f32>::new(TILED_BLOCK_K * TILED_BLOCK_N);
    let mut acc = Array::<f32>::new(16usize);
    #[unroll]
    for i in 0..16usize {
        acc[i] = f32::new(0.0);
    }
    let w_base = e * m * k;

    let mut k0 = 0usize;
    while k0 < k {
        // 1024 operands per tile and per side: 4 per unit. Consecutive units walk the contiguous
        // axis of each operand so that the global reads coalesce.
        #[unroll]
        for s in 0..4usize {
            let q = tid + s * 256;
            let r = q / TILED_BLOCK_K;
            let l = q % TILED_BLOCK_K;
            let row = row0 + r;
            let kk = k0 + l;
            let mut v = f32::new(0.0);
            if row < row_end && kk < k {
                v = f32::cast_from(x[row * k + kk]);
            }
            a_s[r * TILED_BLOCK_K + l] = v;
        }
        #[unroll]
        for s in 0..4usize {
            let q = tid + s * 256;
            let mut v = f32::new(0.0);
            if transpose {
                let c = q / TILED_BLOCK_K;
                let l = q % TILED_BLOCK_K;
                let col = col0 + c;
                let kk = k0 + l;
                if col < m && kk < k {
                    v = f32::cast_from(w[w_base + col * k + kk]);
                }
                b_s[l * TILED_BLOCK_N + c] = v;
            } else {
                let l = q / TILED_BLOCK_N;
                let c = q % TILED_BLOCK_N;
                let col = col0 + c;
                let kk = k0 + l;
                if col < m && kk < k {
                    v = f32::cast_from(w[w_base + kk * m + col]);
                }
                b_s[l * TILED_BLOCK_N + c] = v;
            }
        }
        sync_cube();
        #[unroll]
        for l in 0..TILED_BLOCK_K {
            let mut a = Array::<f32>::new(4usize);
            let mut b = Array::<f32>::new(4usize);
            #[unroll]
            for i in 0..4usize {
                a[i] = a_s[(ty + 16 * i) * TILED_BLOCK_K + l];
                b[i] = b_s[l * TILED_BLOCK_N + tx + 16 * i];
            }
            #[unroll]
            for i in 0..4usize {
                #[unroll]
                for j in 0..4usize {
                    acc[i * 4 + j] += a[i] * b[j];
                }
            }
        }
        sync_cube();
        k0 += TILED_BLOCK_K;
    }

    #[unroll]
    for i in 0..4usize {
        let row = row0 + ty + 16 * i;
        #[unroll]
        for j in 0..4usize {
            let col = col0 + tx + 16 * j;
            if row < row_end && col < m {
                out[row * m + col] = F::cast_from(acc[i * 4 + j]);
            }
        }
    }
}

/// The same product as [`grouped_matmul_tiled_kernel`] on tensor cores, one 128 × 128 tile per cube,
/// for f16/bf16 `F` (f32 accumulation). `x` and `w` are read as vectors of `N` elements, so `k` (and
/// `m` when `!transpose`) must be multiples of `N`; the launcher picks `N` accordingly.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn grouped_matmul_cmma_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    offsets: &Array<u32>,
    tiles: &Array<u32>,
    out: &mut Array<F>,
    m: usize,
    k: usize,
    #[comptime] transpose: bool,
) {
    let nv = N::value();
    // Shared-memory row strides (elements): 8 more than the tile so consecutive rows fall on other
    // banks; multiples of 8 keep every fragment start 32-byte aligned as wmma requires.
    let a_stride = comptime!(CMMA_BLOCK_K + 8);
    let b_stride = comptime!(if transpose { CMMA_BLOCK_K + 8 } else { CMMA_BLOCK_N + 8 });
    let b_layout = comptime!(if transpose { cmma::MatrixLayout::ColMajor } else { cmma::MatrixLayout::RowMajor });
    let b_len = comptime!(if transpose { CMMA_BLOCK_N * (CMMA_BLOCK_K + 8) } else { CMMA_BLOCK_K * (CMMA_BLOCK_N + 8) });

    let tile = CUBE_POS_X as usize;
    let e = tiles[2 * tile] as usize;
    let row0 = tiles[2 * tile + 1] as usize;
    let row_end = offsets[e + 1] as usize;
    let col0 = CUBE_POS_Y as usize * CMMA_BLOCK_N;
    let tid = UNIT_POS as usize;
    let plane = tid / CMMA_PLANE as usize;
    let lane = tid % CMMA_PLANE as usize;
    let plane_row = (plane / 4) * 64;
    let plane_col = (plane % 4) * 32;

    let mut a_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(CMMA_BLOCK_M * (CMMA_BLOCK_K + 8) / nv), 128usize);
    let mut b_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(b_len / nv), 128usize);
    let mut stage = SharedMemory::<f32>::new_aligned(comptime!(8 * 256usize), 128usize);

    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..8usize {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }

    let w_base = e * m * k;
    // The next depth step's operands are read into registers while the tensor cores work on the
    // current one (register prefetch), so global-memory latency overlaps the MMAs.
    let a_loads = comptime!(CMMA_BLOCK_M * CMMA_BLOCK_K / (256 * nv));
    let b_loads = comptime!(CMMA_BLOCK_N * CMMA_BLOCK_K / (256 * nv));
    let mut a_regs = Array::<Vector<F, N>>::new(a_loads);
    let mut b_regs = Array::<Vector<F, N>>::new(b_loads);
    load_cmma_operands::<F, N>(x, w, &mut a_regs, &mut b_regs, tid, row0, row_end, col0, w_base, m, k, 0usize, transpose);
    let mut k0 = 0usize;
    while k0 < k {
        let a_vpr = comptime!(CMMA_BLOCK_K / nv);
        #[unroll]
        for s in 0..a_loads {
            let q = tid + s * 256;
            a_s[(q / a_vpr) * (a_stride / nv) + q % a_vpr] = a_regs[s];
        }
        #[unroll]
        for s in 0..b_loads {
            let q = tid + s * 256;
            let vpr = comptime!(if transpose { CMMA_BLOCK_K / nv } else { CMMA_BLOCK_N / nv });
            b_s[(q / vpr) * (b_stride / nv) + q % vpr] = b_regs[s];
        }
        sync_cube();
        if k0 + CMMA_BLOCK_K < k {
            load_cmma_operands::<F, N>(x, w, &mut a_regs, &mut b_regs, tid, row0, row_end, col0, w_base, m, k, k0 + CMMA_BLOCK_K, transpose);
        }
        #[unroll]
        for ks in 0..comptime!(CMMA_BLOCK_K / 16) {
            let mut a_frags = Sequence::<cmma::Matrix<F>>::new();
            #[unroll]
            for i in 0..4usize {
                let a = unsafe {
                    cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, 16usize, 16usize, 16usize, cmma::MatrixLayout::RowMajor)
                };
                let start = ((plane_row + i * 16) * a_stride + ks * 16) / nv;
                cmma::load(&a, &a_s.slice(start, start + (15 * a_stride + 16) / nv), a_stride as u32);
                a_frags.push(a);
            }
            #[unroll]
            for j in 0..2usize {
                let b = unsafe {
                    cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, 16usize, 16usize, 16usize, b_layout)
                };
                let start = if transpose {
                    ((plane_col + j * 16) * b_stride + ks * 16) / nv
                } else {
                    (ks * 16 * b_stride + plane_col + j * 16) / nv
                };
                cmma::load(&b, &b_s.slice(start, start + (15 * b_stride + 16) / nv), b_stride as u32);
                #[unroll]
                for i in 0..4usize {
                    let acc = &accs[i * 2 + j];
                    cmma::execute::<F, F, f32, f32>(&a_frags[i], &b, acc, acc);
                }
            }
        }
        sync_cube();
        k0 += CMMA_BLOCK_K;
    }

    // Accumulators go through a per-plane f32 staging area so that edge tiles can be bounds-checked
    // element by element (a fragment store writes all 16 × 16 values).
    let stage_start = plane * 256;
    #[unroll]
    for i in 0..4usize {
        #[unroll]
        for j in 0..2usize {
            cmma::store(
                &mut stage.slice_mut(stage_start, stage_start + 256),
                &accs[i * 2 + j],
                16u32,
                cmma::MatrixLayout::RowMajor,
            );
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

/// Reads one depth step (`k0 .. k0 + 32`) of the tensor-core kernel's operands into registers:
/// `a_regs[s]` is vector `tid + 256 s` of the 128 × 32 row-major `x` tile, `b_regs[s]` vector
/// `tid + 256 s` of the `w` tile (128 × 32 column-major when `transpose`, 32 × 128 row-major
/// otherwise). Out-of-range vectors are zero.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_cmma_operands<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    a_regs: &mut Array<Vector<F, N>>,
    b_regs: &mut Array<Vector<F, N>>,
    tid: usize,
    row0: usize,
    row_end: usize,
    col0: usize,
    w_base: usize,
    m: usize,
    k: usize,
    k0: usize,
    #[comptime] transpose: bool,
) {
    let nv = N::value();
    let zero = Vector::<F, N>::new(F::new(0.0));
    let a_vpr = comptime!(CMMA_BLOCK_K / nv);
    #[unroll]
    for s in 0..comptime!(CMMA_BLOCK_M * CMMA_BLOCK_K / (256 * nv)) {
        let q = tid + s * 256;
        let row = row0 + q / a_vpr;
        let kk = k0 + (q % a_vpr) * nv;
        let mut v = zero;
        if row < row_end && kk < k {
            v = x[(row * k + kk) / nv];
        }
        a_regs[s] = v;
    }
    #[unroll]
    for s in 0..comptime!(CMMA_BLOCK_N * CMMA_BLOCK_K / (256 * nv)) {
        let q = tid + s * 256;
        let mut v = zero;
        if transpose {
            // w[e, c, l] is contiguous along l.
            let vpr = comptime!(CMMA_BLOCK_K / nv);
            let col = col0 + q / vpr;
            let kk = k0 + (q % vpr) * nv;
            if col < m && kk < k {
                v = w[(w_base + col * k + kk) / nv];
            }
        } else {
            // w[e, l, c] is contiguous along c.
            let vpr = comptime!(CMMA_BLOCK_N / nv);
            let col = col0 + (q % vpr) * nv;
            let kk = k0 + q / vpr;
            if col < m && kk < k {
                v = w[(w_base + kk * m + col) / nv];
            }
        }
        b_regs[s] = v;
    }
}
