//! Tiled weight-gradient kernels of the grouped matmul: `dw[e] = dy[seg e]ᵀ · x[seg e]`
//! (`dy: [rows, m]`, `x: [rows, k]`, `dw: [E, m, k]`), the reduction running over the rows of
//! expert `e`'s segment. The grid is `(m tiles, k tiles, E)`; an expert without rows writes zeros.
//! Every access is bounds-checked in the kernel (any rows, `m`, `k`), so they launch unchecked.
//!
//! - [`grouped_matmul_weight_grad_tiled_kernel`]: shared memory, f32 accumulation, any float type.
//! - [`grouped_matmul_weight_grad_cmma_kernel`]: tensor cores for f16/bf16 with f32 accumulators.

use cubecl::cmma;
use cubecl::prelude::*;

use super::gemm::{CMMA_BLOCK_K, CMMA_BLOCK_M, CMMA_BLOCK_N, CMMA_PLANE, TILED_BLOCK_K, TILED_BLOCK_M, TILED_BLOCK_N};

/// One 64 × 64 tile of `dw[e]` per cube, 16 segment rows staged per step, 4 × 4 outputs per unit.
#[cube(launch_unchecked)]
pub fn grouped_matmul_weight_grad_tiled_kernel<F: Float>(
    dy: &Array<F>,
    x: &Array<F>,
    offsets: &Array<u32>,
    dw: &mut Array<F>,
    m: usize,
    k: usize,
) {
    let e = CUBE_POS_Z as usize;
    let start = offsets[e] as usize;
    let end = offsets[e + 1] as usize;
    let j0 = CUBE_POS_X as usize * TILED_BLOCK_M;
    let l0 = CUBE_POS_Y as usize * TILED_BLOCK_N;
    let tid = UNIT_POS as usize;
    let tx = tid % 16;
    let ty = tid / 16;

    // a_s[i][j] = dy[i0 + i, j0 + j] and b_s[i][l] = x[i0 + i, l0 + l]: consecutive units walk j and l,
    // the contiguous axes of the global rows, so the reads coalesce.
    let mut a_s = SharedMemory::<f32>::new(TILED_BLOCK_K * TILED_BLOCK_M);
    let mut b_s = SharedMemory::<f32>::new(TILED_BLOCK_K * TILED_BLOCK_N);
    let mut acc = Array::<f32>::new(16usize);
    #[unroll]
    for i in 0..16usize {
        acc[i] = f32::new(0.0);
    }

    let mut i0 = start;
    while i0 < end {
        #[unroll]
        for s in 0..4usize {
            let q = tid + s * 256;
            let i = q / TILED_BLOCK_M;
            let c = q % TILED_BLOCK_M;
            let row = i0 + i;
            let mut a = f32::new(0.0);
            if row < end && j0 + c < m {
                a = f32::cast_from(dy[row * m + j0 + c]);
            }
            a_s[i * TILED_BLOCK_M + c] = a;
            let mut b = f32::new(0.0);
            if row < end && l0 + c < k {
                b = f32::cast_from(x[row * k + l0 + c]);
            }
            b_s[i * TILED_BLOCK_N + c] = b;
        }
        sync_cube();
        #[unroll]
        for i in 0..TILED_BLOCK_K {
            let mut a = Array::<f32>::new(4usize);
            let mut b = Array::<f32>::new(4usize);
            #[unroll]
            for t in 0..4usize {
                a[t] = a_s[i * TILED_BLOCK_M + ty + 16 * t];
                b[t] = b_s[i * TILED_BLOCK_N + tx + 16 * t];
            }
            #[unroll]
            for r in 0..4usize {
                #[unroll]
                for c in 0..4usize {
                    acc[r * 4 + c] += a[r] * b[c];
                }
            }
        }
        sync_cube();
        i0 += TILED_BLOCK_K;
    }

    #[unroll]
    for r in 0..4usize {
        let j = j0 + ty + 16 * r;
        #[unroll]
        for c in 0..4usize {
            let l = l0 + tx + 16 * c;
            if j < m && l < k {
                dw[(e * m + j) * k + l] = F::cast_from(acc[r * 4 + c]);
            }
        }
    }
}

/// One 128 × 128 tile of `dw[e]` per cube on tensor cores (f16/bf16 `F`, f32 accumulators), 32
/// segment rows per step; `dy` and `x` are read as vectors of `N` elements, so `m` and `k` must be
/// multiples of `N`. Plane layout as in the forward kernel: 8 planes, 2 × 4, 64 × 32 outputs each.
#[cube(launch_unchecked)]
pub fn grouped_matmul_weight_grad_cmma_kernel<F: Float, N: Size>(
    dy: &Array<Vector<F, N>>,
    x: &Array<Vector<F, N>>,
    offsets: &Array<u32>,
    dw: &mut Array<F>,
    m: usize,
    k: usize,
) {
    let nv = N::value();
    // Both operands are staged [segment row][column]: dyᵀ is then a column-major A, x a row-major B.
    let a_stride = comptime!(CMMA_BLOCK_M + 8);
    let b_stride = comptime!(CMMA_BLOCK_N + 8);
    let e = CUBE_POS_Z as usize;
    let start = offsets[e] as usize;
    let end = offsets[e + 1] as usize;
    let j0 = CUBE_POS_X as usize * CMMA_BLOCK_M;
    let l0 = CUBE_POS_Y as usize * CMMA_BLOCK_N;
    let tid = UNIT_POS as usize;
    let plane = tid / CMMA_PLANE as usize;
    let lane = tid % CMMA_PLANE as usize;
    let plane_row = (plane / 4) * 64;
    let plane_col = (plane % 4) * 32;

    let mut a_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(CMMA_BLOCK_K * (CMMA_BLOCK_M + 8) / nv), 128usize);
    let mut b_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(CMMA_BLOCK_K * (CMMA_BLOCK_N + 8) / nv), 128usize);
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

    let zero = Vector::<F, N>::new(F::new(0.0));
    let a_vpr = comptime!(CMMA_BLOCK_M / nv);
    let b_vpr = comptime!(CMMA_BLOCK_N / nv);
    let mut i0 = start;
    while i0 < end {
        #[unroll]
        for s in 0..comptime!(CMMA_BLOCK_K * CMMA_BLOCK_M / (256 * nv)) {
            let q = tid + s * 256;
            let i = q / a_vpr;
            let cv = q % a_vpr;
            let row = i0 + i;
            let j = j0 + cv * nv;
            let mut v = zero;
            if row < end && j < m {
                v = dy[(row * m + j) / nv];
            }
            a_s[i * (a_stride / nv) + cv] = v;
        }
        #[unroll]
        for s in 0..comptime!(CMMA_BLOCK_K * CMMA_BLOCK_N / (256 * nv)) {
            let q = tid + s * 256;
            let i = q / b_vpr;
            let cv = q % b_vpr;
            let row = i0 + i;
            let l = l0 + cv * nv;
            let mut v = zero;
            if row < end && l < k {
                v = x[(row * k + l) / nv];
            }
            b_s[i * (b_stride / nv) + cv] = v;
        }
        sync_cube();
        #[unroll]
        for ks in 0..comptime!(CMMA_BLOCK_K / 16) {
            let mut a_frags = Sequence::<cmma::Matrix<F>>::new();
            #[unroll]
            for r in 0..4usize {
                let a = unsafe {
                    cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, 16usize, 16usize, 16usize, cmma::MatrixLayout::ColMajor)
                };
                let first = (ks * 16 * a_stride + plane_row + r * 16) / nv;
                cmma::load(&a, &a_s.slice(first, first + (15 * a_stride + 16) / nv), a_stride as u32);
                a_frags.push(a);
            }
            #[unroll]
            for c in 0..2usize {
                let b = unsafe {
                    cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, 16usize, 16usize, 16usize, cmma::MatrixLayout::RowMajor)
                };
                let first = (ks * 16 * b_stride + plane_col + c * 16) / nv;
                cmma::load(&b, &b_s.slice(first, first + (15 * b_stride + 16) / nv), b_stride as u32);
                #[unroll]
                for r in 0..4usize {
                    let acc = &accs[r * 2 + c];
                    cmma::execute::<F, F, f32, f32>(&a_frags[r], &b, acc, acc);
                }
            }
        }
        sync_cube();
        i0 += CMMA_BLOCK_K;
    }

    let stage_start = plane * 256;
    #[unroll]
    for r in 0..4usize {
        #[unroll]
        for c in 0..2usize {
            cmma::store(
                &mut stage.slice_mut(stage_start, stage_start + 256),
                &accs[r * 2 + c],
                16u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_plane();
            #[unroll]
            for t in 0..8usize {
                let idx = lane + t * 32;
                let j = j0 + plane_row + r * 16 + idx / 16;
                let l = l0 + plane_col + c * 16 + idx % 16;
                if j < m && l < k {
                    dw[(e * m + j) * k + l] = F::cast_from(stage[stage_start + idx]);
                }
            }
            sync_plane();
        }
    }
}
