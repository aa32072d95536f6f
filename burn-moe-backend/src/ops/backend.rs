use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorPrimitive, backend::Backend};

use super::reference;

/// Backend extension for dropless MoE.
///
/// The three ops are the ScatterMoE decomposition of an expert layer: rows are *permuted* into expert
/// order, each expert segment is multiplied by that expert's matrix (*grouped matmul*), and the
/// results are *combined* back per token with the routing weights. Every method has a default
/// implementation from standard Burn ops, so `impl MoeBackend for MyBackend {}` gives a correct (slow)
/// backend; CubeCL backends override them with kernels, and `Autodiff<B>` wraps them with backward
/// passes built from the same ops (each op's adjoint is another of these ops).
///
/// Segment boundaries (`offsets`, `E + 1` entries) are passed on the host: the routing plan is built
/// there by [`kernels_cubecl::RoutingPlan`].
pub trait MoeBackend: Backend {
    /// `out[i] = x[rows[i]]`.
    ///
    /// # Shapes
    /// - `x`: `[T, D]`, `rows`: `[N]` → `[N, D]`
    fn moe_permute(x: FloatTensor<Self>, rows: IntTensor<Self>) -> FloatTensor<Self> {
        Self::float_select(x, 0, rows)
    }

    /// Per expert segment `e` (rows `offsets[e]..offsets[e+1]`): `y = x · w[e]ᵀ` when `transpose`,
    /// else `y = x · w[e]`.
    ///
    /// # Shapes
    /// - `x`: `[N, K]`; `w`: `[E, M, K]` (`transpose`) or `[E, K, M]`; → `[N, M]`
    fn moe_grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        offsets: &[usize],
        transpose: bool,
    ) -> FloatTensor<Self> {
        let out = reference::reference_grouped_matmul::<Self>(float(x), float(w), offsets, transpose);
        out.into_primitive().tensor()
    }

    /// Weight gradient of [`moe_grouped_matmul`](Self::moe_grouped_matmul) with `transpose`:
    /// `dw[e] = dyᵀ[seg e] · x[seg e]`, zero for empty segments.
    ///
    /// # Shapes
    /// - `dy`: `[N, M]`, `x`: `[N, K]` → `[E, M, K]`
    fn moe_grouped_matmul_weight_grad(dy: FloatTensor<Self>, x: FloatTensor<Self>, offsets: &[usize]) -> FloatTensor<Self> {
        reference::reference_grouped_matmul_weight_grad::<Self>(float(dy), float(x), offsets).into_primitive().tensor()
    }

    /// `out[t] = Σ_j weights[t, j] · y[slots[t·k + j]]`: gathers each token's `k` expert outputs from
    /// the sorted rows and sums them with the routing weights.
    ///
    /// # Shapes
    /// - `y`: `[N, D]`, `slots`: `[T·k]`, `weights`: `[T, k]` → `[T, D]`
    fn moe_combine(y: FloatTensor<Self>, slots: IntTensor<Self>, weights: FloatTensor<Self>) -> FloatTensor<Self> {
        let slots = Tensor::<Self, 1, Int>::from_primitive(slots);
        reference::reference_combine::<Self>(float(y), slots, float(weights)).into_primitive().tensor()
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// [`MoeBackend::moe_permute`] on tensors.
pub fn moe_permute<B: MoeBackend>(x: Tensor<B, 2>, rows: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    float(B::moe_permute(x.into_primitive().tensor(), rows.into_primitive()))
}

/// [`MoeBackend::moe_grouped_matmul`] on tensors.
pub fn moe_grouped_matmul<B: MoeBackend>(x: Tensor<B, 2>, w: Tensor<B, 3>, offsets: &[usize], transpose: bool) -> Tensor<B, 2> {
    float(B::moe_grouped_matmul(x.into_primitive().tensor(), w.into_primitive().tensor(), offsets, transpose))
}

/// [`MoeBackend::moe_combine`] on tensors.
pub fn moe_combine<B: MoeBackend>(y: Tensor<B, 2>, slots: Tensor<B, 1, Int>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
    float(B::moe_combine(y.into_primitive().tensor(), slots.into_primitive(), weights.into_primitive().tensor()))
}
