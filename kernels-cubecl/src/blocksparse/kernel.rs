//! The `#[cube]` kernels. One unit computes one output element and accumulates in f32 whatever the
//! storage type. They read only the generic block-CSR arrays (`u32`), so they work for any topology;
//! the expert structure enters through the column → weight mapping: sparse column `n` is column
//! `n mod Fp` of expert `n / Fp`, and columns with `n mod Fp ≥ F` are padding (no weight).
//! A correct baseline: no shared-memory tiling yet.

use cubecl::prelude::*;

/// `out[b, r, c] = Σ_l x[i·bs + r, l] · W(j·bs + c, l)` for nonzero block `b` at (row block `i`,
/// column block `j`), with `W(e·Fp + c, l) = w[e, c, l]` (`transpose`, `w: [E, F, K]`) or `w[e, l, c]`
/// (`w: [E, K, F]`), and zero for padded columns.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn sdd_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    row_indices: &Array<u32>,
    column_indices: &Array<u32>,
    out: &mut Array<F>,
    k: usize,
    block: usize,
    ffn: usize,
    ffn_padded: usize,
    #[comptime] transpose: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let b = pos / (block * block);
    let r = (pos / block) % block;
    let c = pos % block;
    let row = row_indices[b] as usize * block + r;
    let n = column_indices[b] as usize * block + c;
    let e = n / ffn_padded;
    let cc = n % ffn_padded;
    let mut acc = f32::new(0.0);
    if cc < ffn {
        for l in 0..k {
            let wv = if transpose { w[(e * ffn + cc) * k + l] } else { w[(e * k + l) * ffn + cc] };
            acc += f32::cast_from(x[row * k + l]) * f32::cast_from(wv);
        }
    }
    out[pos] = F::cast_from(acc);
}

/// `out[row, o] = Σ_{b in row block} Σ_c s[b, row mod bs, c] · W(j_b·bs + c, o)` with
/// `W(e·Fp + c, o) = w[e, o, c]` (`transpose`, `w: [E, M, F]`) or `w[e, c, o]` (`w: [E, F, M]`);
/// padded columns are skipped.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn dsd_kernel<F: Float>(
    s: &Array<F>,
    w: &Array<F>,
    row_offsets: &Array<u32>,
    column_indices: &Array<u32>,
    out: &mut Array<F>,
    m: usize,
    block: usize,
    ffn: usize,
    ffn_padded: usize,
    #[comptime] transpose: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let row = pos / m;
    let o = pos % m;
    let i = row / block;
    let r = row % block;
    let start = row_offsets[i] as usize;
    let end = row_offsets[i + 1] as usize;
    let mut acc = f32::new(0.0);
    for b in start..end {
        let first = column_indices[b] as usize * block;
        for c in 0..block {
            let n = first + c;
            let e = n / ffn_padded;
            let cc = n % ffn_padded;
            if cc < ffn {
                let wv = if transpose { w[(e * m + o) * ffn + cc] } else { w[(e * ffn + cc) * m + o] };
                acc += f32::cast_from(s[(b * block + r) * block + c]) * f32::cast_from(wv);
            }
        }
    }
    out[pos] = F::cast_from(acc);
}

/// `out[e, c, o] = Σ_r s[r, e·Fp + c] · d[r, o]` over the rows of the column's nonzero blocks, found
/// through the transposed topology; written as `[E, F, M]`, or `[E, M, F]` when `transpose_out`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn dstd_kernel<F: Float>(
    s: &Array<F>,
    d: &Array<F>,
    column_offsets: &Array<u32>,
    row_indices_t: &Array<u32>,
    block_offsets_t: &Array<u32>,
    out: &mut Array<F>,
    m: usize,
    block: usize,
    ffn: usize,
    ffn_padded: usize,
    #[comptime] transpose_out: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let e = pos / (ffn * m);
    let mut c = (pos / m) % ffn;
    let mut o = pos % m;
    if transpose_out {
        o = (pos / ffn) % m;
        c = pos % ffn;
    }
    let n = e * ffn_padded + c;
    let j = n / block;
    let cb = n % block;
    let start = column_offsets[j] as usize;
    let end = column_offsets[j + 1] as usize;
    let mut acc = f32::new(0.0);
    for t in start..end {
        let i = row_indices_t[t] as usize;
        let b = block_offsets_t[t] as usize;
        for r in 0..block {
            acc += f32::cast_from(s[(b * block + r) * block + cb]) * f32::cast_from(d[(i * block + r) * m + o]);
        }
    }
    out[pos] = F::cast_from(acc);
}
