//! Row scatter-add (`out[index[i]] += src[i]`), the adjoint of a row gather, built from the gather-side
//! ops so that CubeCL backends run it without atomics.
//!
//! Burn's `select_assign(.., Add)` on burn-cubecl parallelises over the columns only and walks the
//! index serially (on an H200, 13.7 ms for the [32768, 4096] bf16 gradient of one Mixtral layer's
//! permute, 2026-11-28 ncu profile in BENCHMARKS.md). Here the index is read on the host (a few
//! hundred KiB), inverted into per-output-row lists, and the sums are done by the combine kernel
//! (one output row per work item), or by a plain permute when every row receives exactly one source.

use burn::tensor::{Int, Tensor, TensorData};

use super::backend::{MoeBackend, moe_combine, moe_permute};

/// `out: [num_rows, D]`, zero where no `index` entry points, else the sum of the `src` rows that
/// point there. Reads `index` back from the device (a sync): callers that hold it on the host use
/// [`scatter_add_rows_host`].
///
/// # Shapes
/// - `src`: `[N, D]`, `index`: `[N]` (values in `0..num_rows`) → `[num_rows, D]`
pub(crate) fn scatter_add_rows<B: MoeBackend>(src: Tensor<B, 2>, index: Tensor<B, 1, Int>, num_rows: usize) -> Tensor<B, 2> {
    let host: Vec<i64> = index.into_data().iter::<i64>().collect();
    scatter_add_rows_host(src, &host, num_rows)
}

/// [`scatter_add_rows`] with the index on the host: nothing is read back from the device.
///
/// # Panics
/// When `index` has not one entry per source row or points outside `0..num_rows` (the ops that call
/// this built the index themselves: a broken one is a bug, not an input error).
///
/// # Shapes
/// - `src`: `[N, D]`, `index`: `N` values in `0..num_rows` → `[num_rows, D]`
pub(crate) fn scatter_add_rows_host<B: MoeBackend>(src: Tensor<B, 2>, host: &[i64], num_rows: usize) -> Tensor<B, 2> {
    let [n, d] = src.dims();
    let device = src.device();
    let dtype = src.dtype();
    assert_eq!(host.len(), n, "scatter-add: {} indices for {n} source rows", host.len());
    let mut counts = vec![0usize; num_rows];
    for &r in host {
        let r = usize::try_from(r).ok().filter(|&r| r < num_rows).unwrap_or_else(|| panic!("scatter-add: row index {r} outside 0..{num_rows}"));
        counts[r] += 1;
    }
    let kmax = counts.iter().copied().max().unwrap_or(0);
    if kmax == 0 || d == 0 {
        return Tensor::zeros([num_rows, d], (&device, dtype));
    }
    let uniform = counts.iter().all(|&c| c == kmax);
    // Row lists padded to `kmax` entries; padding points at an extra zero row (index `n`).
    let mut slots = vec![n as i64; num_rows * kmax];
    let mut fill = vec![0usize; num_rows];
    for (i, &r) in host.iter().enumerate() {
        let r = r as usize;
        slots[r * kmax + fill[r]] = i as i64;
        fill[r] += 1;
    }
    let len = slots.len();
    let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [len]), &device);
    if uniform && kmax == 1 {
        return moe_permute(src, slots);
    }
    let src = if uniform { src } else { Tensor::cat(vec![src, Tensor::zeros([1, d], (&device, dtype))], 0) };
    moe_combine(src, slots, Tensor::ones([num_rows, kmax], (&device, dtype)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::IndexingUpdateOp;

    type B = NdArray<f32>;

    fn check(index: Vec<i64>, num_rows: usize) {
        let device = Default::default();
        let n = index.len();
        let src = Tensor::<B, 2>::from_data(TensorData::new((0..n * 3).map(|v| v as f32 * 0.5 - 1.0).collect::<Vec<_>>(), [n, 3]), &device);
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(index.clone(), [n]), &device);
        let want = Tensor::<B, 2>::zeros([num_rows, 3], &device).select_assign(0, idx.clone(), src.clone(), IndexingUpdateOp::Add);
        let got = scatter_add_rows(src.clone(), idx, num_rows);
        got.into_data().assert_approx_eq::<f32>(&want.clone().into_data(), burn::tensor::Tolerance::absolute(1e-6));
        let got = scatter_add_rows_host(src, &index, num_rows);
        got.into_data().assert_approx_eq::<f32>(&want.into_data(), burn::tensor::Tolerance::absolute(1e-6));
    }

    #[test]
    fn matches_select_assign() {
        check(vec![2, 0, 1], 3); // a permutation
        check(vec![1, 0, 1, 0, 2, 2], 3); // each row twice (top-2 routing)
        check(vec![3, 3, 3, 0], 5); // uneven, rows 1, 2, 4 untouched
        check(vec![], 4); // nothing routed
    }
}

#[cfg(test)]
mod swiglu_tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData, Tolerance};

    use crate::ops::moe_swiglu;

    type B = Autodiff<NdArray<f32>>;

    #[test]
    fn swiglu_op_and_gradients_match_tensor_ops() {
        let device = Default::default();
        let g0: Vec<f32> = (0..12).map(|i| i as f32 * 0.7 - 4.0).collect();
        let u0: Vec<f32> = (0..12).map(|i| 1.5 - i as f32 * 0.3).collect();
        let mk = |v: &Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v.clone(), [3, 4]), &device).require_grad();
        let (g, u) = (mk(&g0), mk(&u0));
        let h = moe_swiglu(g.clone(), u.clone());
        let (g2, u2) = (mk(&g0), mk(&u0));
        let want = burn::tensor::activation::silu(g2.clone()) * u2.clone();
        h.clone().into_data().assert_approx_eq::<f32>(&want.clone().into_data(), Tolerance::absolute(1e-6));
        let probe = Tensor::<B, 2>::from_data(TensorData::new((0..12).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>(), [3, 4]), &device);
        let gr = (h * probe.clone()).sum().backward();
        let gw = (want * probe).sum().backward();
        g.grad(&gr).unwrap().into_data().assert_approx_eq::<f32>(&g2.grad(&gw).unwrap().into_data(), Tolerance::absolute(1e-5));
        u.grad(&gr).unwrap().into_data().assert_approx_eq::<f32>(&u2.grad(&gw).unwrap().into_data(), Tolerance::absolute(1e-5));
    }
}
