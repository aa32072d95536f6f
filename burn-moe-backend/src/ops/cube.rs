//! [`MoeBackend`] for CubeCL backends (`CubeBackend<R, F, I, BT>`: CUDA, wgpu, ...): the ops run the
//! `kernels-cubecl` scatter and block-sparse kernels. Each launch follows the tensors' *runtime* dtypes (a
//! `CubeBackend<_, bf16>` tensor can hold f32 data), so the element types are chosen per call.

use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn::tensor::ops::{FloatTensor, IntTensor};
use kernels_cubecl::attention::{launch_attention_softmax, launch_attention_softmax_backward};
use kernels_cubecl::optim::{AdamWBuffers, launch_adamw, launch_sum_squares, sum_squares_cubes};
use kernels_cubecl::rmsnorm::{launch_rms_norm, launch_rms_norm_backward, launch_rms_norm_weight_grad};
use kernels_cubecl::xent::{launch_cross_entropy, launch_cross_entropy_backward};
use kernels_cubecl::gate::{launch_gate_logits, launch_gate_weight_grad};
use kernels_cubecl::{CrossEntropyProblem, GateProblem, RmsNormProblem};
use kernels_cubecl::{BlockSparseTopology, SoftmaxBlock};
use kernels_cubecl::blocksparse::{BlockSparseProblem, TopologyBuffers, launch_dsd, launch_dstd, launch_sdd};
use kernels_cubecl::swiglu::{launch_swiglu, launch_swiglu_backward};
use kernels_cubecl::scatter::{
    GroupedMatmulProblem, cmma_supported, launch_combine, launch_combine_backward, launch_grouped_matmul, launch_grouped_matmul_weight_grad, launch_permute,
};

use super::backend::{AdamWUpdate, MoeBackend};
use super::reference::{reference_gate_logits, reference_gate_weight_grad};

/// Calls `$body` with `$f` bound to the Rust float type of `$dtype`.
macro_rules! with_float {
    ($dtype:expr, $f:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $f = f32;
                $body
            }
            DType::F16 => {
                type $f = half::f16;
                $body
            }
            DType::BF16 => {
                type $f = half::bf16;
                $body
            }
            other => panic!("MoE kernels support f32, f16 and bf16 tensors, not {other:?}"),
        }
    };
}

/// Calls `$body` with `$i` bound to the Rust integer type of `$dtype`.
macro_rules! with_int {
    ($dtype:expr, $i:ident => $body:expr) => {
        match $dtype {
            DType::I32 => {
                type $i = i32;
                $body
            }
            DType::I64 => {
                type $i = i64;
                $body
            }
            DType::U32 => {
                type $i = u32;
                $body
            }
            other => panic!("MoE index tensors must be i32, i64 or u32, not {other:?}"),
        }
    };
}

fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: [usize; 2], dtype: DType) -> CubeTensor<R> {
    empty_nd(like, shape, dtype)
}

/// A contiguous uninitialised tensor on `like`'s device (at least one element's bytes, so empty
/// shapes still get a valid buffer).
pub(super) fn empty_nd<R: CubeRuntime, const D: usize>(like: &CubeTensor<R>, shape: [usize; D], dtype: DType) -> CubeTensor<R> {
    empty_shape(like, Shape::new(shape), dtype)
}

/// [`empty_nd`] for a shape of any rank.
fn empty_shape<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    let bytes = (shape.num_elements() * dtype.size()).max(dtype.size());
    let handle = like.client.empty(bytes);
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), shape, handle, dtype)
}

fn topology_buffers<R: CubeRuntime>(like: &CubeTensor<R>, topology: &BlockSparseTopology) -> TopologyBuffers {
    TopologyBuffers::upload(&like.client, topology).unwrap_or_else(|e| panic!("block-sparse topology: {e}"))
}

fn offsets_buffer<R: CubeRuntime>(like: &CubeTensor<R>, offsets: &[usize]) -> cubecl::server::Handle {
    let host: Vec<u32> = offsets.iter().map(|&o| u32::try_from(o).expect("more than u32::MAX MoE rows")).collect();
    like.client.create_from_slice(bytemuck_u32(&host))
}

fn bytemuck_u32(v: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Multiply-adds up to which the `kernels-cubecl` kernels without tensor cores are used (the tiled
/// shared-memory grouped matmul and weight gradient); above it, each expert segment goes through
/// Burn's tuned matmul, unless (forward only) the device has the tensor-core grouped matmul for the
/// dtype (forward and weight gradient: both tensor-core kernels were checked against the f32 tiled
/// kernel on an H200 — weight gradient 148–160 TFLOP/s, 2026-11-28 x4 call in BENCHMARKS.md).
/// Measured on an H200 (BENCHMARKS.md, 2026-11-28 grouped GEMM section): the tensor-core grouped
/// matmul (bf16) runs at 100–105 TFLOP/s against 93 for Burn's single dense matmul of the same size,
/// but the shared-memory kernel (f32 operands, or no cmma) reaches only 19–29 TFLOP/s, well below
/// Burn's tensor-core (tf32) matmul, so large f32 problems keep the per-segment path.
const DIRECT_KERNEL_MAX_MACS: usize = 1 << 22;

/// `x: [rows, k]` times `w: [E, m, k]` (or `[E, k, m]`): `rows · m · k` multiply-adds.
fn small_grouped_matmul<R: CubeRuntime>(x: &CubeTensor<R>, w: &CubeTensor<R>) -> bool {
    let (sx, sw) = (x.meta.shape(), w.meta.shape());
    sx[0].saturating_mul(sw[1]).saturating_mul(sw[2]) <= DIRECT_KERNEL_MAX_MACS
}

/// `dy: [rows, m]` and `x: [rows, k]`: `rows · m · k` multiply-adds.
fn use_direct_weight_grad<R: CubeRuntime>(dy: &CubeTensor<R>, x: &CubeTensor<R>) -> bool {
    let (sd, sx) = (dy.meta.shape(), x.meta.shape());
    sd[0].saturating_mul(sd[1]).saturating_mul(sx[1]) <= DIRECT_KERNEL_MAX_MACS
}

fn float<B: burn::tensor::backend::Backend, const D: usize>(t: FloatTensor<B>) -> burn::tensor::Tensor<B, D> {
    burn::tensor::Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t))
}

/// Burn's matmul once per non-empty expert segment: the large-problem path where the device has no
/// tensor-core grouped matmul for the dtype (see [`DIRECT_KERNEL_MAX_MACS`]).
fn segment_matmul<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: FloatTensor<CubeBackend<R, F, I, BT>>,
    w: FloatTensor<CubeBackend<R, F, I, BT>>,
    offsets: &[usize],
    transpose: bool,
) -> FloatTensor<CubeBackend<R, F, I, BT>> {
    crate::ops::reference_grouped_matmul::<CubeBackend<R, F, I, BT>>(float(x), float(w), offsets, transpose)
        .into_primitive()
        .tensor()
}

/// Elementwise operands: same shape and dtype.
fn check_same<R: CubeRuntime>(op: &str, tensors: &[&CubeTensor<R>]) {
    for t in &tensors[1..] {
        assert_eq!(t.meta.shape(), tensors[0].meta.shape(), "{op}: operand shapes differ");
        assert_eq!(t.dtype, tensors[0].dtype, "{op}: operand dtypes differ");
    }
}

/// Shapes and dtypes of a grouped matmul: `x: [N, K]`, `w: [E, M, K]` (`transpose`) or `[E, K, M]`.
fn check_grouped_matmul<R: CubeRuntime>(x: &CubeTensor<R>, w: &CubeTensor<R>, transpose: bool) {
    let (sx, ws) = (x.meta.shape(), w.meta.shape());
    assert_eq!(if transpose { ws[2] } else { ws[1] }, sx[1], "grouped matmul: inner sizes differ (x {sx:?}, w {ws:?})");
    assert_eq!(x.dtype, w.dtype, "grouped matmul: x is {:?} but w is {:?}", x.dtype, w.dtype);
}

/// Shapes and dtypes of a weight gradient: `dy: [N, M]`, `x: [N, K]`, `offsets` ending at `N`.
fn check_weight_grad<R: CubeRuntime>(dy: &CubeTensor<R>, x: &CubeTensor<R>, offsets: &[usize]) {
    let (sd, sx) = (dy.meta.shape(), x.meta.shape());
    assert_eq!(sd[0], sx[0], "grouped matmul weight grad: dy {sd:?} and x {sx:?} have different row counts");
    let end = offsets.last().copied().unwrap_or(0);
    assert!(end <= sd[0], "grouped matmul weight grad: offsets end at row {end}, dy has {} rows", sd[0]);
    assert_eq!(dy.dtype, x.dtype, "grouped matmul weight grad: dy is {:?} but x is {:?}", dy.dtype, x.dtype);
}

/// The `kernels-cubecl` grouped matmul (tensor-core where available), or Burn's per-segment matmul
/// for large problems without tensor cores.
fn grouped_matmul_cubecl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    offsets: &[usize],
    transpose: bool,
) -> CubeTensor<R> {
    let tensor_cores = with_float!(x.dtype, FE => cmma_supported::<R, FE>(&x.client));
    if !tensor_cores && !small_grouped_matmul(&x, &w) {
        return segment_matmul::<R, F, I, BT>(x, w, offsets, transpose);
    }
    let x = into_contiguous(x);
    let w = into_contiguous(w);
    check_grouped_matmul(&x, &w, transpose);
    let (n, k) = (x.meta.shape()[0], x.meta.shape()[1]);
    let ws = w.meta.shape();
    let (e, m) = (ws[0], if transpose { ws[1] } else { ws[2] });
    let problem = GroupedMatmulProblem { rows: n, m, k, num_experts: e, transpose };
    let out = empty(&x, [n, m], x.dtype);
    let dev_offsets = offsets_buffer(&x, offsets);
    with_float!(x.dtype, FE => launch_grouped_matmul::<R, FE>(
        &x.client, &problem, offsets, x.handle.clone(), w.handle.clone(), dev_offsets, out.handle.clone()
    ))
    .unwrap_or_else(|e| panic!("grouped matmul: {e}"));
    out
}

/// The `kernels-cubecl` weight gradient (tensor-core where available), or Burn's per-segment matmul
/// for large problems without tensor cores.
fn grouped_matmul_weight_grad_cubecl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    dy: CubeTensor<R>,
    x: CubeTensor<R>,
    offsets: &[usize],
) -> CubeTensor<R> {
    let tensor_cores = with_float!(dy.dtype, FE => cmma_supported::<R, FE>(&dy.client));
    if !tensor_cores && !use_direct_weight_grad(&dy, &x) {
        let grad = crate::ops::reference_grouped_matmul_weight_grad::<CubeBackend<R, F, I, BT>>(float(dy), float(x), offsets);
        return grad.into_primitive().tensor();
    }
    let dy = into_contiguous(dy);
    let x = into_contiguous(x);
    check_weight_grad(&dy, &x, offsets);
    let (n, m, k) = (dy.meta.shape()[0], dy.meta.shape()[1], x.meta.shape()[1]);
    let e = offsets.len() - 1;
    let problem = GroupedMatmulProblem { rows: n, m, k, num_experts: e, transpose: true };
    let dw = empty_nd(&dy, [e, m, k], dy.dtype);
    let dev_offsets = offsets_buffer(&dy, offsets);
    with_float!(dy.dtype, FE => launch_grouped_matmul_weight_grad::<R, FE>(
        &dy.client, &problem, offsets, dy.handle.clone(), x.handle.clone(), dev_offsets, dw.handle.clone()
    ))
    .unwrap_or_else(|e| panic!("grouped matmul weight grad: {e}"));
    dw
}

/// `t` contiguous and in `dtype` (cast only when it differs): the per-row statistics the kernels read
/// as f32 (log-sum-exps, corrections, `rstd`, loss gradients) whatever the caller's dtype, a norm
/// scale kept in another precision than its activations, a gradient returned in its parameter's.
fn contiguous_in<R: CubeRuntime>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    into_contiguous(if t.dtype == dtype { t } else { burn_cubecl::kernel::cast(t, dtype) })
}

/// Whether the kernels serve `dtype` (the float types `with_float!` dispatches); other dtypes take
/// the trait's tensor-op defaults.
fn has_kernels(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// The kernels' problem for `x: [N, D]` and a scale of `D` values; panics naming the shapes otherwise
/// (a shape bug of the caller, as Burn's own ops do).
fn rms_norm_problem<R: CubeRuntime>(x: &CubeTensor<R>, weight: &CubeTensor<R>, eps: f64) -> RmsNormProblem {
    let (xs, ws) = (x.meta.shape(), weight.meta.shape());
    assert!(
        xs.num_dims() == 2 && ws.num_elements() == xs[1],
        "RMSNorm: input {xs:?} and scale {ws:?} (want [N, D] and [D])"
    );
    RmsNormProblem { rows: xs[0], dim: xs[1], eps: eps as f32 }
}

/// The kernels' problem for `logits: [N, V]` and `N` targets; panics naming the shapes otherwise (a
/// shape bug of the caller, as Burn's own ops do).
fn cross_entropy_problem<R: CubeRuntime>(logits: &CubeTensor<R>, targets: &CubeTensor<R>) -> CrossEntropyProblem {
    let (ls, ts) = (logits.meta.shape(), targets.meta.shape());
    assert!(
        ls.num_dims() == 2 && ts.num_elements() == ls[0],
        "cross-entropy: logits {ls:?} and targets {ts:?} (want [N, V] and [N])"
    );
    CrossEntropyProblem { rows: ls[0], vocab: ls[1] }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> MoeBackend for CubeBackend<R, F, I, BT> {
    fn moe_permute(x: FloatTensor<Self>, rows: IntTensor<Self>) -> FloatTensor<Self> {
        let x = into_contiguous(x);
        let rows = into_contiguous(rows);
        let [t, d] = [x.meta.shape()[0], x.meta.shape()[1]];
        let n = rows.meta.shape()[0];
        let out = empty(&x, [n, d], x.dtype);
        with_float!(x.dtype, FE => with_int!(rows.dtype, IE => launch_permute::<R, FE, IE>(
            &x.client, x.handle.clone(), t, rows.handle.clone(), n, d, out.handle.clone()
        )));
        out
    }

    fn moe_grouped_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>, offsets: &[usize], transpose: bool) -> FloatTensor<Self> {
        #[cfg(feature = "cublas")]
        if crate::gemm::grouped_gemm() == crate::gemm::GroupedGemm::Cublas {
            let (x, w) = (into_contiguous(x), into_contiguous(w));
            check_grouped_matmul(&x, &w, transpose);
            match super::cublas::grouped_matmul(&x, &w, offsets, transpose) {
                Some(out) => return out,
                None => return grouped_matmul_cubecl::<R, F, I, BT>(x, w, offsets, transpose),
            }
        }
        grouped_matmul_cubecl::<R, F, I, BT>(x, w, offsets, transpose)
    }

    fn moe_grouped_matmul_weight_grad(dy: FloatTensor<Self>, x: FloatTensor<Self>, offsets: &[usize]) -> FloatTensor<Self> {
        #[cfg(feature = "cublas")]
        if crate::gemm::grouped_gemm() == crate::gemm::GroupedGemm::Cublas {
            let (dy, x) = (into_contiguous(dy), into_contiguous(x));
            check_weight_grad(&dy, &x, offsets);
            match super::cublas::grouped_matmul_weight_grad(&dy, &x, offsets) {
                Some(dw) => return dw,
                None => return grouped_matmul_weight_grad_cubecl::<R, F, I, BT>(dy, x, offsets),
            }
        }
        grouped_matmul_weight_grad_cubecl::<R, F, I, BT>(dy, x, offsets)
    }

    fn moe_combine(y: FloatTensor<Self>, slots: IntTensor<Self>, weights: FloatTensor<Self>) -> FloatTensor<Self> {
        let y = into_contiguous(y);
        let slots = into_contiguous(slots);
        let weights = into_contiguous(weights);
        let (n, d) = (y.meta.shape()[0], y.meta.shape()[1]);
        let (t, k) = (weights.meta.shape()[0], weights.meta.shape()[1]);
        assert_eq!(y.dtype, weights.dtype, "combine: y is {:?} but weights are {:?}", y.dtype, weights.dtype);
        let out = empty(&y, [t, d], y.dtype);
        with_float!(y.dtype, FE => with_int!(slots.dtype, IE => launch_combine::<R, FE, IE>(
            &y.client, y.handle.clone(), n, slots.handle.clone(), weights.handle.clone(), t, k, d, out.handle.clone()
        )));
        out
    }

    fn moe_gate_logits(x: FloatTensor<Self>, gate: FloatTensor<Self>) -> FloatTensor<Self> {
        let (t, d) = (x.meta.shape()[0], x.meta.shape()[1]);
        let e = gate.meta.shape()[0];
        let problem = GateProblem { tokens: t, dim: d, experts: e };
        if problem.check().is_err() || !has_kernels(x.dtype) {
            // More experts than the kernel keeps sums for (or no kernel for the type): Burn's matmul.
            return reference_gate_logits::<Self>(float(x), float(gate)).into_primitive().tensor();
        }
        let dtype = x.dtype;
        let (x, gate) = (into_contiguous(x), contiguous_in(gate, dtype));
        let out = empty(&x, [t, e], dtype);
        with_float!(dtype, FE => launch_gate_logits::<R, FE>(&x.client, &problem, x.handle.clone(), gate.handle.clone(), out.handle.clone()))
            .unwrap_or_else(|err| unreachable!("gate logits checked above: {err}"));
        out
    }

    fn moe_gate_weight_grad(dlogits: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (t, d) = (x.meta.shape()[0], x.meta.shape()[1]);
        let e = dlogits.meta.shape()[1];
        let problem = GateProblem { tokens: t, dim: d, experts: e };
        if problem.check().is_err() || !has_kernels(x.dtype) {
            return reference_gate_weight_grad::<Self>(float(dlogits), float(x)).into_primitive().tensor();
        }
        let dtype = x.dtype;
        let (dlogits, x) = (contiguous_in(dlogits, dtype), into_contiguous(x));
        let dgate = empty(&x, [e, d], dtype);
        match with_float!(dtype, FE => launch_gate_weight_grad::<R, FE>(&x.client, &problem, dlogits.handle.clone(), x.handle.clone(), dgate.handle.clone())) {
            Ok(()) => dgate,
            // A row wider than the column kernel's grid (tens of millions of values): Burn's matmul.
            Err(_) => reference_gate_weight_grad::<Self>(float(dlogits), float(x)).into_primitive().tensor(),
        }
    }

    fn moe_combine_backward(
        dout: FloatTensor<Self>,
        y: FloatTensor<Self>,
        slots: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (n, d) = (y.meta.shape()[0], y.meta.shape()[1]);
        let (t, k) = (weights.meta.shape()[0], weights.meta.shape()[1]);
        // One storage type for the kernel: the output gradient and the weights follow `y` (in the
        // layers they already do; a cast is a no-op then).
        let dtype = y.dtype;
        let weights_dtype = weights.dtype;
        let dout = contiguous_in(dout, dtype);
        let weights = contiguous_in(weights, dtype);
        let y = into_contiguous(y);
        let slots = into_contiguous(slots);
        let dy = empty(&y, [n, d], dtype);
        let dweights = empty(&y, [t, k], dtype);
        with_float!(dtype, FE => with_int!(slots.dtype, IE => launch_combine_backward::<R, FE, IE>(
            &y.client, dout.handle.clone(), y.handle.clone(), n, slots.handle.clone(), weights.handle.clone(), t, k, d,
            dy.handle.clone(), dweights.handle.clone()
        )))
        .unwrap_or_else(|e| panic!("combine backward: {e}"));
        let dweights = if weights_dtype == dtype { dweights } else { burn_cubecl::kernel::cast(dweights, weights_dtype) };
        (dy, dweights)
    }

    fn moe_adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        hyper: &kernels_cubecl::optim::AdamWHyper,
        copy: Option<FloatDType>,
    ) -> AdamWUpdate<Self> {
        let (param, grad, m, v) = (into_contiguous(param), into_contiguous(grad), into_contiguous(m), into_contiguous(v));
        check_same("AdamW", &[&param, &m, &v]);
        assert_eq!(grad.meta.shape(), param.meta.shape(), "AdamW: the gradient's shape differs from the parameter's");
        let shape = param.meta.shape().clone();
        let len = shape.num_elements();
        let out = || empty_shape(&param, shape.clone(), param.dtype);
        let (p_out, m_out, v_out) = (out(), out(), out());
        // f32 masters (mixed precision) take a gradient and give a copy of any float type in the
        // pass; a narrower parameter keeps one type for all (the gradient cast first if it differs,
        // the copy cast after).
        let wide = param.dtype == DType::F32;
        let grad = if wide || grad.dtype == param.dtype { grad } else { burn_cubecl::kernel::cast(grad, param.dtype) };
        let fused_copy = copy.map(DType::from).filter(|_| wide);
        let copy_out = fused_copy.map(|dtype| empty_shape(&param, shape.clone(), dtype));
        let buffers = AdamWBuffers {
            param: param.handle.clone(),
            grad: grad.handle.clone(),
            m: m.handle.clone(),
            v: v.handle.clone(),
            param_out: p_out.handle.clone(),
            m_out: m_out.handle.clone(),
            v_out: v_out.handle.clone(),
            copy_out: copy_out.as_ref().map(|c| c.handle.clone()),
        };
        let client = &param.client;
        if wide {
            with_float!(grad.dtype, GE => with_float!(fused_copy.unwrap_or(DType::F32), HE =>
                launch_adamw::<R, f32, GE, HE>(client, len, hyper, buffers)))
        } else {
            with_float!(param.dtype, FE => launch_adamw::<R, FE, FE, FE>(client, len, hyper, buffers))
        }
        .unwrap_or_else(|e| panic!("AdamW: {e}"));
        let copy = match (copy_out, copy) {
            (Some(c), _) => Some(c),
            (None, Some(dtype)) => Some(burn_cubecl::kernel::cast(p_out.clone(), DType::from(dtype))),
            (None, None) => None,
        };
        AdamWUpdate { param: p_out, m: m_out, v: v_out, copy }
    }

    fn moe_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let len = x.meta.shape().num_elements();
        if len == 0 || !has_kernels(x.dtype) {
            return crate::optim::sum_squares_ops::<Self>(x);
        }
        let x = into_contiguous(x);
        let partials = empty_nd::<R, 1>(&x, [sum_squares_cubes(len)], DType::F32);
        with_float!(x.dtype, FE => launch_sum_squares::<R, FE>(&x.client, len, x.handle.clone(), partials.handle.clone()))
            .unwrap_or_else(|e| panic!("sum of squares: {e}"));
        // The partials (at most a thousand) summed by Burn's reduction.
        float::<Self, 1>(partials).sum().into_primitive().tensor()
    }

    fn moe_attention_softmax(scores: FloatTensor<Self>, block: &SoftmaxBlock) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let scores = into_contiguous(scores);
        assert_eq!(
            (scores.meta.shape()[0], scores.meta.shape()[1]),
            (block.rows, block.keys),
            "attention softmax: scores {:?} vs block {block:?}",
            scores.meta.shape()
        );
        let probs = empty(&scores, [block.rows, block.keys], scores.dtype);
        let lse = empty_nd::<R, 1>(&scores, [block.rows], DType::F32);
        with_float!(scores.dtype, FE => launch_attention_softmax::<R, FE>(
            &scores.client, block, scores.handle.clone(), probs.handle.clone(), lse.handle.clone()
        ))
        .unwrap_or_else(|e| panic!("attention softmax: {e}"));
        (probs, lse)
    }

    fn moe_attention_softmax_backward(
        scores: FloatTensor<Self>,
        dprobs: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        correction: FloatTensor<Self>,
        block: &SoftmaxBlock,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (scores, dprobs) = (into_contiguous(scores), into_contiguous(dprobs));
        let (lse, correction) = (contiguous_in(lse, DType::F32), contiguous_in(correction, DType::F32));
        check_same("attention softmax backward", &[&scores, &dprobs]);
        assert_eq!(
            (scores.meta.shape()[0], scores.meta.shape()[1], lse.meta.shape().num_elements(), correction.meta.shape().num_elements()),
            (block.rows, block.keys, block.rows, block.rows),
            "attention softmax backward: scores {:?}, lse {:?}, correction {:?} vs block {block:?}",
            scores.meta.shape(),
            lse.meta.shape(),
            correction.meta.shape()
        );
        let probs = empty(&scores, [block.rows, block.keys], scores.dtype);
        let d_scores = empty(&scores, [block.rows, block.keys], scores.dtype);
        with_float!(scores.dtype, FE => launch_attention_softmax_backward::<R, FE>(
            &scores.client, block, scores.handle.clone(), dprobs.handle.clone(), lse.handle.clone(), correction.handle.clone(),
            probs.handle.clone(), d_scores.handle.clone()
        ))
        .unwrap_or_else(|e| panic!("attention softmax backward: {e}"));
        (probs, d_scores)
    }

    fn moe_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !has_kernels(x.dtype) {
            let (y, rstd) = crate::norm::rms_norm_ops::<Self>(float(x), float(weight), eps);
            return (y.into_primitive().tensor(), rstd.into_primitive().tensor());
        }
        let x = into_contiguous(x);
        let weight = contiguous_in(weight, x.dtype);
        let problem = rms_norm_problem(&x, &weight, eps);
        let y = empty(&x, [problem.rows, problem.dim], x.dtype);
        let rstd = empty_nd::<R, 1>(&x, [problem.rows], DType::F32);
        with_float!(x.dtype, FE => launch_rms_norm::<R, FE>(
            &x.client, &problem, x.handle.clone(), weight.handle.clone(), y.handle.clone(), rstd.handle.clone()
        ))
        .unwrap_or_else(|e| panic!("RMSNorm: {e}"));
        (y, rstd)
    }

    fn moe_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if !has_kernels(x.dtype) {
            let (dx, dw) = crate::norm::rms_norm_backward_ops::<Self>(float(x), float(weight), float(rstd), float(dy), weight_grad);
            return (dx.into_primitive().tensor(), dw.map(|t| t.into_primitive().tensor()));
        }
        let weight_dtype = weight.dtype;
        let (x, dy) = (into_contiguous(x), into_contiguous(dy));
        let weight = contiguous_in(weight, x.dtype);
        let rstd = contiguous_in(rstd, DType::F32);
        check_same("RMSNorm backward", &[&x, &dy]);
        let problem = rms_norm_problem(&x, &weight, 0.0);
        assert_eq!(rstd.meta.shape().num_elements(), problem.rows, "RMSNorm backward: rstd {:?} for {} rows", rstd.meta.shape(), problem.rows);
        let dx = empty(&x, [problem.rows, problem.dim], x.dtype);
        with_float!(x.dtype, FE => launch_rms_norm_backward::<R, FE>(
            &x.client, &problem, x.handle.clone(), weight.handle.clone(), rstd.handle.clone(), dy.handle.clone(), dx.handle.clone()
        ))
        .unwrap_or_else(|e| panic!("RMSNorm backward: {e}"));
        let dw = weight_grad.then(|| {
            let dw = empty_nd::<R, 1>(&x, [problem.dim], x.dtype);
            with_float!(x.dtype, FE => launch_rms_norm_weight_grad::<R, FE>(
                &x.client, &problem, x.handle.clone(), rstd.handle.clone(), dy.handle.clone(), dw.handle.clone()
            ))
            .unwrap_or_else(|e| panic!("RMSNorm weight gradient: {e}"));
            // The gradient in the scale's own dtype (the kernels ran in the activations').
            contiguous_in(dw, weight_dtype)
        });
        (dx, dw)
    }

    fn moe_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !has_kernels(logits.dtype) {
            let (nll, lse) = crate::loss::cross_entropy_ops::<Self>(float(logits), burn::tensor::Tensor::from_primitive(targets));
            return (nll.into_primitive().tensor(), lse.into_primitive().tensor());
        }
        let (logits, targets) = (into_contiguous(logits), into_contiguous(targets));
        let problem = cross_entropy_problem(&logits, &targets);
        let nll = empty_nd::<R, 1>(&logits, [problem.rows], DType::F32);
        let lse = empty_nd::<R, 1>(&logits, [problem.rows], DType::F32);
        with_float!(logits.dtype, FE => with_int!(targets.dtype, IE => launch_cross_entropy::<R, FE, IE>(
            &logits.client, &problem, logits.handle.clone(), targets.handle.clone(), nll.handle.clone(), lse.handle.clone()
        )))
        .unwrap_or_else(|e| panic!("cross-entropy: {e}"));
        (nll, lse)
    }

    fn moe_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dnll: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !has_kernels(logits.dtype) {
            return crate::loss::cross_entropy_backward_ops::<Self>(
                float(logits),
                burn::tensor::Tensor::from_primitive(targets),
                float(lse),
                float(dnll),
            )
            .into_primitive()
            .tensor();
        }
        let (logits, targets) = (into_contiguous(logits), into_contiguous(targets));
        let (lse, dnll) = (contiguous_in(lse, DType::F32), contiguous_in(dnll, DType::F32));
        let problem = cross_entropy_problem(&logits, &targets);
        assert_eq!(
            (lse.meta.shape().num_elements(), dnll.meta.shape().num_elements()),
            (problem.rows, problem.rows),
            "cross-entropy backward: lse {:?}, dnll {:?} for {} rows",
            lse.meta.shape(),
            dnll.meta.shape(),
            problem.rows
        );
        let dlogits = empty(&logits, [problem.rows, problem.vocab], logits.dtype);
        with_float!(logits.dtype, FE => with_int!(targets.dtype, IE => launch_cross_entropy_backward::<R, FE, IE>(
            &logits.client, &problem, logits.handle.clone(), targets.handle.clone(), lse.handle.clone(), dnll.handle.clone(),
            dlogits.handle.clone()
        )))
        .unwrap_or_else(|e| panic!("cross-entropy backward: {e}"));
        dlogits
    }

    fn moe_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (gate, up) = (into_contiguous(gate), into_contiguous(up));
        check_same("SwiGLU", &[&gate, &up]);
        let out = empty_nd::<R, 2>(&gate, [gate.meta.shape()[0], gate.meta.shape()[1]], gate.dtype);
        let len = gate.meta.shape().num_elements();
        with_float!(gate.dtype, FE => launch_swiglu::<R, FE>(&gate.client, len, gate.handle.clone(), up.handle.clone(), out.handle.clone()))
            .unwrap_or_else(|e| panic!("SwiGLU: {e}"));
        out
    }

    fn moe_swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, dh: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (gate, up, dh) = (into_contiguous(gate), into_contiguous(up), into_contiguous(dh));
        check_same("SwiGLU backward", &[&gate, &up, &dh]);
        let shape = [gate.meta.shape()[0], gate.meta.shape()[1]];
        let (d_gate, d_up) = (empty_nd::<R, 2>(&gate, shape, gate.dtype), empty_nd::<R, 2>(&gate, shape, gate.dtype));
        let len = gate.meta.shape().num_elements();
        with_float!(gate.dtype, FE => launch_swiglu_backward::<R, FE>(
            &gate.client, len, gate.handle.clone(), up.handle.clone(), dh.handle.clone(), d_gate.handle.clone(), d_up.handle.clone()
        ))
        .unwrap_or_else(|e| panic!("SwiGLU backward: {e}"));
        (d_gate, d_up)
    }

    fn moe_sdd(x: FloatTensor<Self>, w: FloatTensor<Self>, topology: &BlockSparseTopology, transpose: bool) -> FloatTensor<Self> {
        let x = into_contiguous(x);
        let w = into_contiguous(w);
        let (rows, k) = (x.meta.shape()[0], x.meta.shape()[1]);
        let ws = w.meta.shape();
        assert_eq!(x.dtype, w.dtype, "sdd: x is {:?} but w is {:?}", x.dtype, w.dtype);
        assert_eq!(rows, topology.rows(), "sdd: x has {rows} rows, the topology {}", topology.rows());
        let (ffn, inner) = if transpose { (ws[1], ws[2]) } else { (ws[2], ws[1]) };
        assert_eq!((ws[0], ffn, inner), (topology.num_experts(), topology.ffn(), k), "sdd: weight shape {:?} vs x {:?}", ws, x.meta.shape());
        let problem = BlockSparseProblem::for_topology(topology, k, transpose);
        let bs = topology.block();
        let out = empty_nd(&x, [topology.nnz(), bs, bs], x.dtype);
        let buffers = topology_buffers(&x, topology);
        with_float!(x.dtype, FE => launch_sdd::<R, FE>(
            &x.client, &problem, topology, &buffers, x.handle.clone(), w.handle.clone(), out.handle.clone()
        ))
        .unwrap_or_else(|e| panic!("sdd: {e}"));
        out
    }

    fn moe_dsd(s: FloatTensor<Self>, w: FloatTensor<Self>, topology: &BlockSparseTopology, transpose: bool) -> FloatTensor<Self> {
        let s = into_contiguous(s);
        let w = into_contiguous(w);
        let ws = w.meta.shape();
        assert_eq!(s.dtype, w.dtype, "dsd: s is {:?} but w is {:?}", s.dtype, w.dtype);
        assert_eq!(s.meta.shape().num_elements(), topology.sparse_len(), "dsd: sparse operand {:?} vs topology", s.meta.shape());
        let (ffn, m) = if transpose { (ws[2], ws[1]) } else { (ws[1], ws[2]) };
        assert_eq!((ws[0], ffn), (topology.num_experts(), topology.ffn()), "dsd: weight shape {ws:?} vs topology");
        let problem = BlockSparseProblem::for_topology(topology, m, transpose);
        let out = empty(&s, [topology.rows(), m], s.dtype);
        let buffers = topology_buffers(&s, topology);
        with_float!(s.dtype, FE => launch_dsd::<R, FE>(
            &s.client, &problem, topology, &buffers, s.handle.clone(), w.handle.clone(), out.handle.clone()
        ))
        .unwrap_or_else(|e| panic!("dsd: {e}"));
        out
    }

    fn moe_dstd(s: FloatTensor<Self>, d: FloatTensor<Self>, topology: &BlockSparseTopology, transpose_out: bool) -> FloatTensor<Self> {
        let s = into_contiguous(s);
        let d = into_contiguous(d);
        let (rows, m) = (d.meta.shape()[0], d.meta.shape()[1]);
        assert_eq!(s.dtype, d.dtype, "dstd: s is {:?} but d is {:?}", s.dtype, d.dtype);
        assert_eq!(rows, topology.rows(), "dstd: d has {rows} rows, the topology {}", topology.rows());
        assert_eq!(s.meta.shape().num_elements(), topology.sparse_len(), "dstd: sparse operand {:?} vs topology", s.meta.shape());
        let problem = BlockSparseProblem::for_topology(topology, m, transpose_out);
        let (e, f) = (topology.num_experts(), topology.ffn());
        let out = empty_nd(&s, if transpose_out { [e, m, f] } else { [e, f, m] }, s.dtype);
        let buffers = topology_buffers(&s, topology);
        with_float!(s.dtype, FE => launch_dstd::<R, FE>(
            &s.client, &problem, topology, &buffers, s.handle.clone(), d.handle.clone(), out.handle.clone()
        ))
        .unwrap_or_else(|e| panic!("dstd: {e}"));
        out
    }
}
