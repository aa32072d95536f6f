//! RMSNorm as one backend op ([`MoeBackend::moe_rms_norm`]) with its own backward pass: the default
//! implementations below are Burn tensor ops (any backend; the same operations, in the same order, as
//! the reference model's norm), CubeCL backends run the fused kernels of `kernels_cubecl::rmsnorm`.

use burn::tensor::{DType, Tensor, backend::Backend};

/// `(y, rstd)`: `rstd = 1 / sqrt(mean(x²) + eps)` per row in f32 whatever `x`'s dtype, and
/// `y = (x · rstd) · weight` with the normalised row cast back to `x`'s dtype before the scale (as Hugging
/// Face's `MixtralRMSNorm`). Tensor ops: the default of [`MoeBackend::moe_rms_norm`](crate::MoeBackend::moe_rms_norm).
///
/// # Shapes
/// - `x`: `[N, D]`, `weight`: `[D]` → `[N, D]` and `[N]`
pub fn rms_norm_ops<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 1>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let [n, d] = x.dims();
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let variance = x.clone().powi_scalar(2).mean_dim(1);
    let rstd = variance.add_scalar(eps).sqrt().recip();
    let normed = (x * rstd.clone()).cast(dtype);
    (normed * weight.reshape([1, d]), rstd.reshape([n]))
}

/// `(dx, dw)` of [`rms_norm_ops`] for the output gradient `dy`, from the forward pass's `rstd`: with
/// `n = x · rstd` and `dn = dy · weight`, `dx = rstd · (dn − n · mean(dn · n))` (the casts pass
/// gradients through), and, when `weight_grad`, `dw = Σ_rows dy · n` with `n` in `x`'s dtype (what the
/// scale multiplied). Tensor ops: the default of
/// [`MoeBackend::moe_rms_norm_backward`](crate::MoeBackend::moe_rms_norm_backward).
///
/// # Shapes
/// - `x`, `dy`: `[N, D]`, `weight`: `[D]`, `rstd`: `[N]` → `[N, D]` and `[D]`
pub fn rms_norm_backward_ops<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    rstd: Tensor<B, 1>,
    dy: Tensor<B, 2>,
    weight_grad: bool,
) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
    let [n, d] = x.dims();
    let dtype = x.dtype();
    let rstd = rstd.cast(DType::F32).reshape([n, 1]);
    let normed = x.cast(DType::F32) * rstd.clone();
    let dn = (dy.clone() * weight.reshape([1, d])).cast(DType::F32);
    let mean = (dn.clone() * normed.clone()).mean_dim(1);
    let dx = ((dn - normed.clone() * mean) * rstd).cast(dtype);
    let dw = weight_grad.then(|| (dy * normed.cast(dtype)).sum_dim(0).reshape([d]));
    (dx, dw)
}
