use std::sync::Arc;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{FloatDType, Int, Tensor, TensorPrimitive, backend::Backend};
use kernels_cubecl::BlockSparseTopology;

use super::reference;

/// What [`MoeBackend::moe_adamw_step`] returns: the updated parameter and moments (in the
/// parameter's dtype) and, when asked for, the parameter rounded to the compute dtype.
#[derive(Debug, Clone)]
pub struct AdamWUpdate<B: Backend> {
    /// The new parameter.
    pub param: FloatTensor<B>,
    /// The new first moment.
    pub m: FloatTensor<B>,
    /// The new second moment.
    pub v: FloatTensor<B>,
    /// The new parameter in the requested compute dtype.
    pub copy: Option<FloatTensor<B>>,
}

/// A row index (of [`MoeBackend::moe_permute`] or [`MoeBackend::moe_combine`]) that the caller also
/// holds on the host, as the MoE layers do: they build their routing plan there.
///
/// Why: the backward of a row gather is a scatter-add, which the CubeCL backends compute from the
/// index inverted on the host; with the host copy at hand the backward reads nothing back from the
/// device, so it does not wait for the device to drain (two such syncs per layer backward otherwise).
/// Cheap to clone (shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIndex(Arc<[i64]>);

impl HostIndex {
    /// The index values.
    pub fn as_slice(&self) -> &[i64] {
        &self.0
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the entries are `0..len` in some order, each once (what
    /// [`MoeBackend::moe_combine_backward`] needs of its slots). O(len) on the host.
    pub fn is_permutation(&self) -> bool {
        let n = self.0.len();
        let mut seen = vec![false; n];
        self.0.iter().all(|&v| usize::try_from(v).ok().filter(|&i| i < n).is_some_and(|i| !std::mem::replace(&mut seen[i], true)))
    }

    /// The same values as a 1-d device tensor.
    pub fn tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        crate::reference::index_tensor(self.0.to_vec(), device)
    }
}

impl From<Vec<i64>> for HostIndex {
    fn from(v: Vec<i64>) -> Self {
        Self(v.into())
    }
}

/// Backend extension for dropless MoE.
///
/// Permute, grouped matmul and combine are the ScatterMoE decomposition of an expert layer: rows are
/// *permuted* into expert order, each expert segment is multiplied by that expert's matrix (*grouped
/// matmul*), and the results are *combined* back per token with the routing weights. The MegaBlocks
/// decomposition keeps permute and combine (on rows padded per expert to the block size) and replaces
/// the grouped matmuls by block-sparse products on a [`BlockSparseTopology`]: SDD (up-projections),
/// DSD (down-projection) and DSᵀD (their weight gradients). Every method has a default
/// implementation from standard Burn ops, so `impl MoeBackend for MyBackend {}` gives a correct (slow)
/// backend; CubeCL backends override them with kernels, and `Autodiff<B>` wraps them with backward
/// passes built from the same ops (each op's adjoint is another of these ops).
///
/// Segment boundaries (`offsets`, `E + 1` entries) and block-sparse topologies are passed on the
/// host: the routing plan is built there by [`kernels_cubecl::RoutingPlan`].
pub trait MoeBackend: Backend {
    /// `out[i] = x[rows[i]]`.
    ///
    /// # Shapes
    /// - `x`: `[T, D]`, `rows`: `[N]` → `[N, D]`
    fn moe_permute(x: FloatTensor<Self>, rows: IntTensor<Self>) -> FloatTensor<Self> {
        Self::float_select(x, 0, rows)
    }

    /// [`moe_permute`](Self::moe_permute) where `rows_host` holds the same values as `rows`, so that a
    /// differentiating backend builds the backward without reading `rows` back (see [`HostIndex`]).
    ///
    /// # Shapes
    /// As [`moe_permute`](Self::moe_permute).
    fn moe_permute_host(x: FloatTensor<Self>, rows: IntTensor<Self>, rows_host: &HostIndex) -> FloatTensor<Self> {
        let _ = rows_host;
        Self::moe_permute(x, rows)
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

    /// [`moe_combine`](Self::moe_combine) where `slots_host` holds the same values as `slots` (see
    /// [`HostIndex`]).
    ///
    /// # Shapes
    /// As [`moe_combine`](Self::moe_combine).
    fn moe_combine_host(y: FloatTensor<Self>, slots: IntTensor<Self>, slots_host: &HostIndex, weights: FloatTensor<Self>) -> FloatTensor<Self> {
        let _ = slots_host;
        Self::moe_combine(y, slots, weights)
    }

    /// Both gradients of [`moe_combine`](Self::moe_combine) for the output gradient `dout`, when
    /// `slots` names every row of `y` exactly once (a permutation of `0..N`, `N = T·k`: what the MoE
    /// layers' routing plans give): `dy[slots[t·k + j]] = weights[t, j] · dout[t]` and
    /// `dweights[t, j] = Σ_c dout[t, c] · y[slots[t·k + j], c]`. One pass over `dout` and `y` where
    /// the general backward (a gather, a product, a row sum, a scatter-add) takes five; the caller
    /// checks the permutation (on the host, [`HostIndex::is_permutation`]).
    ///
    /// # Shapes
    /// - `dout`: `[T, D]`, `y`: `[N, D]`, `slots`: `[N]`, `weights`: `[T, k]` → (`dy`: `[N, D]`,
    ///   `dweights`: `[T, k]`)
    fn moe_combine_backward(
        dout: FloatTensor<Self>,
        y: FloatTensor<Self>,
        slots: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let slots = Tensor::<Self, 1, Int>::from_primitive(slots);
        let (dy, dw) = reference::reference_combine_backward::<Self>(float(dout), float(y), slots, float(weights));
        (dy.into_primitive().tensor(), dw.into_primitive().tensor())
    }

    /// One AdamW update of a parameter, elementwise (burn-optim's `AdamW` formula; see
    /// [`crate::optim::FusedAdamW`]): the new parameter and first and second moments, and with
    /// `copy` the new parameter rounded to that dtype (mixed precision's compute copy for the next
    /// step). `grad` may be narrower than the parameter (a bf16 gradient of f32 master weights): it
    /// is widened first, exactly as a cast would. The default composes it from tensor ops in
    /// burn-optim's order (the same numbers as its `AdamW`) with casts around; CubeCL backends run
    /// one fused kernel that reads the narrow gradient and writes the copy in the same pass.
    ///
    /// # Shapes
    /// - `param`, `grad`, `m`, `v`: the same shape → [`AdamWUpdate`] of that shape
    fn moe_adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        hyper: &kernels_cubecl::optim::AdamWHyper,
        copy: Option<FloatDType>,
    ) -> AdamWUpdate<Self> {
        crate::optim::adamw_update_ops::<Self>(param, grad, m, v, hyper, copy)
    }

    /// `Σ x²` over every element, in f32 (f64 for f64 tensors), as a one-element tensor: the
    /// gradient norm's sum of squares. The default is tensor ops
    /// ([`sum_squares_ops`](crate::optim::sum_squares_ops)); CubeCL backends read the tensor once
    /// (partial sums per cube, then their sum). A statistic, not differentiated.
    ///
    /// # Shapes
    /// - `x`: any shape → `[1]`
    fn moe_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::optim::sum_squares_ops::<Self>(x)
    }

    /// The router's logits `x · gateᵀ` for a gate of a few rows (`E`, one per expert). Default:
    /// Burn's matmul; CubeCL backends run a cube per token that reads `x` once (a tiled matmul gives
    /// an 8-column output a few dozen cubes). Under `Autodiff` the gate's gradient is
    /// [`moe_gate_weight_grad`](Self::moe_gate_weight_grad) and `x`'s Burn's matmul `dlogits · gate`.
    ///
    /// # Shapes
    /// - `x`: `[T, D]`, `gate`: `[E, D]` → `[T, E]`
    fn moe_gate_logits(x: FloatTensor<Self>, gate: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::reference_gate_logits::<Self>(float(x), float(gate)).into_primitive().tensor()
    }

    /// The gate's gradient `dlogitsᵀ · x` of [`moe_gate_logits`](Self::moe_gate_logits). Default:
    /// Burn's matmul; CubeCL backends sum row chunks of `x` per column (partials in f32) and then the
    /// chunks.
    ///
    /// # Shapes
    /// - `dlogits`: `[T, E]`, `x`: `[T, D]` → `[E, D]`
    fn moe_gate_weight_grad(dlogits: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::reference_gate_weight_grad::<Self>(float(dlogits), float(x)).into_primitive().tensor()
    }

    /// RMSNorm of each row: `y = (x · rstd) · weight` with `rstd = 1 / sqrt(mean(x²) + eps)` in f32
    /// and the normalised row rounded to `x`'s dtype before the scale (Hugging Face's
    /// `MixtralRMSNorm`); returns `y` and `rstd` (f32), which the backward pass reuses. The default is
    /// tensor ops ([`rms_norm_ops`](crate::norm::rms_norm_ops)); CubeCL backends run one kernel, a
    /// cube per row. Under `Autodiff` the backward pass is
    /// [`moe_rms_norm_backward`](Self::moe_rms_norm_backward).
    ///
    /// # Shapes
    /// - `x`: `[N, D]`, `weight`: `[D]` → `[N, D]` and `[N]`
    fn moe_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (y, rstd) = crate::norm::rms_norm_ops::<Self>(float(x), float(weight), eps);
        (y.into_primitive().tensor(), rstd.into_primitive().tensor())
    }

    /// Gradients of [`moe_rms_norm`](Self::moe_rms_norm) for the output gradient `dy`: `dx`, and `dw`
    /// when `weight_grad` (a frozen scale, as under LoRA, skips it). Default from tensor ops
    /// ([`rms_norm_backward_ops`](crate::norm::rms_norm_backward_ops)); on CubeCL backends a cube per
    /// row for `dx` and a column reduction in row chunks for `dw`.
    ///
    /// # Shapes
    /// - `x`, `dy`: `[N, D]`, `weight`: `[D]`, `rstd`: `[N]` → `[N, D]` and `[D]`
    fn moe_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let (dx, dw) = crate::norm::rms_norm_backward_ops::<Self>(float(x), float(weight), float(rstd), float(dy), weight_grad);
        (dx.into_primitive().tensor(), dw.map(|t| t.into_primitive().tensor()))
    }

    /// Cross-entropy of each row of `logits` against its target: the negative log-likelihood `nll`
    /// and the log-sum-exp `lse` (both f32 whatever the logits' dtype; `lse` is what the backward pass
    /// reuses). A target outside `0..V` (the ignore index −100) gives 0. The default is tensor ops
    /// ([`cross_entropy_ops`](crate::loss::cross_entropy_ops)); CubeCL backends run one kernel, a cube
    /// per row, reading the logits in their own dtype. Under `Autodiff` the backward pass is
    /// [`moe_cross_entropy_backward`](Self::moe_cross_entropy_backward).
    ///
    /// # Shapes
    /// - `logits`: `[N, V]`, `targets`: `[N]` → `[N]` and `[N]`
    fn moe_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (nll, lse) = crate::loss::cross_entropy_ops::<Self>(float(logits), Tensor::from_primitive(targets));
        (nll.into_primitive().tensor(), lse.into_primitive().tensor())
    }

    /// The logits' gradient of [`moe_cross_entropy`](Self::moe_cross_entropy) for the losses' gradient
    /// `dnll`: `dnll · (softmax − onehot(target))`, in the logits' dtype. Default from tensor ops
    /// ([`cross_entropy_backward_ops`](crate::loss::cross_entropy_backward_ops)); one kernel on CubeCL
    /// backends.
    ///
    /// # Shapes
    /// - `logits`: `[N, V]`, `targets`, `lse`, `dnll`: `[N]` → `[N, V]`
    fn moe_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dnll: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        crate::loss::cross_entropy_backward_ops::<Self>(float(logits), Tensor::from_primitive(targets), float(lse), float(dnll))
            .into_primitive()
            .tensor()
    }

    /// Causal attention ([`CausalAttention`](crate::attention::CausalAttention)): the output and each
    /// query's f32 log-sum-exp of its scores. The default works through the queries a block at a
    /// time with tensor ops ([`attention_forward`](crate::attention::attention_forward)); under
    /// `Autodiff` the backward pass is [`moe_attention_backward`](Self::moe_attention_backward), which
    /// recomputes the scores instead of keeping them.
    ///
    /// # Shapes
    /// - `q`: `[B, H, S, hd]`, `k`, `v`: `[B, KV, S, hd]` (`KV` divides `H`) → `[B, H, S, hd]` and `[B, H, S]`
    fn moe_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: &crate::attention::CausalAttention,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, lse) = crate::attention::attention_forward::<Self>(float(q), float(k), float(v), spec);
        (out.into_primitive().tensor(), lse.into_primitive().tensor())
    }

    /// Gradients `(dq, dk, dv)` of [`moe_attention`](Self::moe_attention) for the output gradient
    /// `dout`, from its inputs, output and log-sum-exp
    /// ([`attention_backward`](crate::attention::attention_backward)).
    ///
    /// # Shapes
    /// - as [`moe_attention`](Self::moe_attention); `out`, `dout`: `[B, H, S, hd]`, `lse`: `[B, H, S]`
    ///   → `[B, H, S, hd]`, `[B, KV, S, hd]`, `[B, KV, S, hd]`
    #[allow(clippy::too_many_arguments)]
    fn moe_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        spec: &crate::attention::CausalAttention,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) =
            crate::attention::attention_backward::<Self>(float(q), float(k), float(v), float(out), float(lse), float(dout), spec);
        (dq.into_primitive().tensor(), dk.into_primitive().tensor(), dv.into_primitive().tensor())
    }

    /// Softmax of one block of raw causal-attention scores (what [`moe_attention`](Self::moe_attention)
    /// runs per block of queries): scale, mask by [`SoftmaxBlock`](crate::attention::SoftmaxBlock),
    /// softmax over each row's visible keys. Returns the probabilities in the scores' dtype and each
    /// row's log-sum-exp (f32; f64 for f64 scores). The default is made of tensor ops
    /// ([`attention_softmax_ops`](crate::attention::attention_softmax_ops)); CubeCL backends run one
    /// kernel.
    ///
    /// # Shapes
    /// - `scores`: `[rows, keys]` → `[rows, keys]` and `[rows]`
    fn moe_attention_softmax(
        scores: FloatTensor<Self>,
        block: &crate::attention::SoftmaxBlock,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (probs, lse) = crate::attention::attention_softmax_ops::<Self>(float(scores), block);
        (probs.into_primitive().tensor(), lse.into_primitive().tensor())
    }

    /// The backward pass of [`moe_attention_softmax`](Self::moe_attention_softmax) for the
    /// probability gradients `dprobs`: the probabilities rebuilt from the log-sum-exps `lse`, and the
    /// score gradients `scale · p · (dprobs − correction)` (`correction` per row: `Σ p · dprobs`), both
    /// in the scores' dtype. Default from tensor ops
    /// ([`attention_softmax_backward_ops`](crate::attention::attention_softmax_backward_ops)); one
    /// kernel on CubeCL backends.
    ///
    /// # Shapes
    /// - `scores`, `dprobs`: `[rows, keys]`, `lse`, `correction`: `[rows]` → two `[rows, keys]`
    fn moe_attention_softmax_backward(
        scores: FloatTensor<Self>,
        dprobs: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        correction: FloatTensor<Self>,
        block: &crate::attention::SoftmaxBlock,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (probs, d_scores) =
            crate::attention::attention_softmax_backward_ops::<Self>(float(scores), float(dprobs), float(lse), float(correction), block);
        (probs.into_primitive().tensor(), d_scores.into_primitive().tensor())
    }

    /// SwiGLU activation of the expert layers: `silu(gate) · up`, elementwise.
    ///
    /// # Shapes
    /// - `gate`, `up`: `[N, F]` → `[N, F]`
    fn moe_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let h = burn::tensor::activation::silu(float::<Self, 2>(gate)) * float::<Self, 2>(up);
        h.into_primitive().tensor()
    }

    /// Gradients of [`moe_swiglu`](Self::moe_swiglu) for the output gradient `dh`:
    /// `(d_gate, d_up) = (dh · up · σ(g) · (1 + g · (1 − σ(g))), dh · silu(g))`.
    ///
    /// # Shapes
    /// - `gate`, `up`, `dh`: `[N, F]` → two `[N, F]`
    fn moe_swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, dh: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (g, u, d) = (float::<Self, 2>(gate), float::<Self, 2>(up), float::<Self, 2>(dh));
        let sig = burn::tensor::activation::sigmoid(g.clone());
        let d_up = d.clone() * g.clone() * sig.clone();
        let d_gate = d * u * sig.clone() * ((-sig + 1.0) * g + 1.0);
        (d_gate.into_primitive().tensor(), d_up.into_primitive().tensor())
    }

    /// Block-sparse SDD (MegaBlocks): the nonzero blocks of `x · Wcatᵀ` on `topology`, where sparse
    /// column `e·Fp + c` is expert `e`'s hidden unit `c` (padded units, `c ≥ F`, are zero).
    /// `w: [E, F, K]` when `transpose` (PyTorch `[out, in]`), else `[E, K, F]`.
    ///
    /// # Shapes
    /// - `x`: `[Tp, K]` (sorted, padded rows) → `[nnz, bs, bs]`
    fn moe_sdd(x: FloatTensor<Self>, w: FloatTensor<Self>, topology: &BlockSparseTopology, transpose: bool) -> FloatTensor<Self> {
        reference::reference_sdd::<Self>(float(x), float(w), topology, transpose).into_primitive().tensor()
    }

    /// Block-sparse DSD: `s · Wcat` with `w: [E, M, F]` when `transpose`, else `[E, F, M]`; padded
    /// hidden units of `s` are ignored.
    ///
    /// # Shapes
    /// - `s`: `[nnz, bs, bs]` → `[Tp, M]`
    fn moe_dsd(s: FloatTensor<Self>, w: FloatTensor<Self>, topology: &BlockSparseTopology, transpose: bool) -> FloatTensor<Self> {
        reference::reference_dsd::<Self>(float(s), float(w), topology, transpose).into_primitive().tensor()
    }

    /// Block-sparse DSᵀD, the weight gradient of both products: `out[e, c, m] = Σ_r s[r, e·Fp + c] ·
    /// d[r, m]` for the real hidden units, as `[E, F, M]` or, when `transpose_out`, `[E, M, F]`;
    /// zeros for experts without rows.
    ///
    /// # Shapes
    /// - `s`: `[nnz, bs, bs]`, `d`: `[Tp, M]` → `[E, F, M]` or `[E, M, F]`
    fn moe_dstd(s: FloatTensor<Self>, d: FloatTensor<Self>, topology: &BlockSparseTopology, transpose_out: bool) -> FloatTensor<Self> {
        reference::reference_dstd::<Self>(float(s), float(d), topology, transpose_out).into_primitive().tensor()
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// [`MoeBackend::moe_permute`] on tensors.
pub fn moe_permute<B: MoeBackend>(x: Tensor<B, 2>, rows: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    float(B::moe_permute(x.into_primitive().tensor(), rows.into_primitive()))
}

/// [`MoeBackend::moe_permute_host`] on tensors: `out[i] = x[rows[i]]` with the index given on the
/// host (uploaded here).
pub fn moe_permute_host<B: MoeBackend>(x: Tensor<B, 2>, rows: &HostIndex) -> Tensor<B, 2> {
    let device = x.device();
    float(B::moe_permute_host(x.into_primitive().tensor(), rows.tensor::<B>(&device).into_primitive(), rows))
}

/// [`MoeBackend::moe_grouped_matmul`] on tensors.
pub fn moe_grouped_matmul<B: MoeBackend>(x: Tensor<B, 2>, w: Tensor<B, 3>, offsets: &[usize], transpose: bool) -> Tensor<B, 2> {
    float(B::moe_grouped_matmul(x.into_primitive().tensor(), w.into_primitive().tensor(), offsets, transpose))
}

/// Whether dense products of `dtype` tensors go through the grouped GEMMs ([`moe_linear`], the
/// chunked attention's block products): in half precision (f16/bf16) only. Why: on CubeCL backends
/// that puts them on the experts' tensor-core kernels — on an H200, Burn 0.21's own bf16 matmul ran
/// the LM head's product at 47 TFLOP/s and a `[T·k, d]×[d, ffn]` one at 94, the grouped GEMMs at
/// 330–370 (BENCHMARKS.md). In f32/f64 Burn's matmul stays: on CUDA it uses TF32 tensor cores, which
/// the grouped kernels lack for f32, and the grouped op picking between its exact kernel and Burn's
/// by problem size would change results with the batch size.
pub fn uses_grouped_gemm(dtype: burn::tensor::DType) -> bool {
    matches!(dtype, burn::tensor::DType::F16 | burn::tensor::DType::BF16)
}

/// `x · wᵀ` for a weight in PyTorch's `[out, in]` layout: where [`uses_grouped_gemm`], a dense layer
/// as a one-segment [`MoeBackend::moe_grouped_matmul`], differentiated through the grouped op's
/// adjoint pair (`dx = dy · w`, `dw = dyᵀ · x`); else Burn's matmul.
///
/// # Shapes
/// - `x`: `[N, in]`, `w`: `[out, in]` → `[N, out]`
pub fn moe_linear<B: MoeBackend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    if !uses_grouped_gemm(x.dtype()) {
        return x.matmul(w.transpose());
    }
    let [n, _] = x.dims();
    let [m, k] = w.dims();
    moe_grouped_matmul(x, w.reshape([1, m, k]), &[0, n], true)
}

/// [`MoeBackend::moe_gate_logits`] on tensors: the router's logits `x · gateᵀ`, differentiable.
///
/// # Shapes
/// - `x`: `[T, D]`, `gate`: `[E, D]` → `[T, E]`
pub fn moe_gate_logits<B: MoeBackend>(x: Tensor<B, 2>, gate: Tensor<B, 2>) -> Tensor<B, 2> {
    float(B::moe_gate_logits(x.into_primitive().tensor(), gate.into_primitive().tensor()))
}

/// [`MoeBackend::moe_sum_squares`] on tensors: `Σ x²` in f32 (f64 for f64), shape `[1]`.
pub fn moe_sum_squares<B: MoeBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, 1> {
    float(B::moe_sum_squares(x.into_primitive().tensor()))
}

/// [`MoeBackend::moe_rms_norm`] on tensors of any rank: RMSNorm over the last dimension (the other
/// dimensions are rows), differentiable through the op's own backward pass.
///
/// # Shapes
/// - `x`: `[..., D]`, `weight`: `[D]` → `[..., D]`
pub fn moe_rms_norm<B: MoeBackend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let dims = x.dims();
    let d = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let (y, _) = B::moe_rms_norm(x.reshape([rows, d]).into_primitive().tensor(), weight.into_primitive().tensor(), eps);
    float::<B, 2>(y).reshape(dims)
}

/// [`MoeBackend::moe_cross_entropy`] on tensors: each row's negative log-likelihood of its target
/// (f32; 0 for a target outside `0..V`, such as the ignore index −100), differentiable in the logits
/// through the op's own backward pass.
///
/// # Shapes
/// - `logits`: `[N, V]`, `targets`: `[N]` → `[N]`
pub fn moe_cross_entropy<B: MoeBackend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let (nll, _) = B::moe_cross_entropy(logits.into_primitive().tensor(), targets.into_primitive());
    float(nll)
}

/// [`MoeBackend::moe_combine`] on tensors.
pub fn moe_combine<B: MoeBackend>(y: Tensor<B, 2>, slots: Tensor<B, 1, Int>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
    float(B::moe_combine(y.into_primitive().tensor(), slots.into_primitive(), weights.into_primitive().tensor()))
}

/// [`MoeBackend::moe_combine_host`] on tensors, the slots given on the host (uploaded here).
pub fn moe_combine_host<B: MoeBackend>(y: Tensor<B, 2>, slots: &HostIndex, weights: Tensor<B, 2>) -> Tensor<B, 2> {
    let device = y.device();
    float(B::moe_combine_host(y.into_primitive().tensor(), slots.tensor::<B>(&device).into_primitive(), slots, weights.into_primitive().tensor()))
}

/// [`MoeBackend::moe_swiglu`] on tensors: `silu(gate) · up`.
pub fn moe_swiglu<B: MoeBackend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    float(B::moe_swiglu(gate.into_primitive().tensor(), up.into_primitive().tensor()))
}

/// [`MoeBackend::moe_sdd`] on tensors.
pub fn moe_sdd<B: MoeBackend>(x: Tensor<B, 2>, w: Tensor<B, 3>, topology: &BlockSparseTopology, transpose: bool) -> Tensor<B, 3> {
    float(B::moe_sdd(x.into_primitive().tensor(), w.into_primitive().tensor(), topology, transpose))
}

/// [`MoeBackend::moe_dsd`] on tensors.
pub fn moe_dsd<B: MoeBackend>(s: Tensor<B, 3>, w: Tensor<B, 3>, topology: &BlockSparseTopology, transpose: bool) -> Tensor<B, 2> {
    float(B::moe_dsd(s.into_primitive().tensor(), w.into_primitive().tensor(), topology, transpose))
}

/// [`MoeBackend::moe_dstd`] on tensors.
pub fn moe_dstd<B: MoeBackend>(s: Tensor<B, 3>, d: Tensor<B, 2>, topology: &BlockSparseTopology, transpose_out: bool) -> Tensor<B, 3> {
    float(B::moe_dstd(s.into_primitive().tensor(), d.into_primitive().tensor(), topology, transpose_out))
}
