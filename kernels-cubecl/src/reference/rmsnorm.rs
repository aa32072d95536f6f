//! Plain-Rust RMSNorm and its gradients (f64 math), the ground truth of [`crate::rmsnorm`].
//!
//! `round` is the storage type's rounding (identity for f32 storage, e.g. `|v| f16::from_f32(v).to_f32()`
//! for f16): the normalised row is rounded before the scale multiplies it, and the product again, as
//! the reference model (Hugging Face's `MixtralRMSNorm`) does.

/// `(y, rstd)` of `rows × dim` values `x` with scale `w`: `rstd = 1 / sqrt(mean(x²) + eps)` per row,
/// `y = round(round(x · rstd) · w)`.
pub fn rms_norm(x: &[f32], w: &[f32], dim: usize, eps: f64, round: impl Fn(f32) -> f32) -> (Vec<f32>, Vec<f32>) {
    let mut y = Vec::with_capacity(x.len());
    let mut rstd = Vec::new();
    for row in x.chunks(dim.max(1)) {
        let r = 1.0 / (row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / dim as f64 + eps).sqrt();
        for (&v, &s) in row.iter().zip(w) {
            let n = round((f64::from(v) * r) as f32);
            y.push(round((f64::from(n) * f64::from(s)) as f32));
        }
        rstd.push(r as f32);
    }
    (y, rstd)
}

/// `(dx, dw)` for the output gradient `dy`: with `n = x · rstd`, `dn = dy · w`,
/// `dx = rstd · (dn − n · mean(dn · n))` and `dw = Σ_rows dy · round(n)` (the rounded row is what the
/// scale multiplied; the rounding itself passes gradients through).
pub fn rms_norm_backward(x: &[f32], w: &[f32], dy: &[f32], dim: usize, eps: f64, round: impl Fn(f32) -> f32) -> (Vec<f32>, Vec<f32>) {
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![0.0f64; dim];
    for (row, drow) in x.chunks(dim.max(1)).zip(dy.chunks(dim.max(1))) {
        let r = 1.0 / (row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / dim as f64 + eps).sqrt();
        let n: Vec<f64> = row.iter().map(|&v| f64::from(v) * r).collect();
        let dn: Vec<f64> = drow.iter().zip(w).map(|(&d, &s)| f64::from(d) * f64::from(s)).collect();
        let mean = n.iter().zip(&dn).map(|(a, b)| a * b).sum::<f64>() / dim as f64;
        for c in 0..dim {
            dx.push((r * (dn[c] - n[c] * mean)) as f32);
            dw[c] += f64::from(drow[c]) * f64::from(round(n[c] as f32));
        }
    }
    (dx, dw.into_iter().map(|v| v as f32).collect())
}
