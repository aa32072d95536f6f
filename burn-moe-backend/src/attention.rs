//! Causal multi-head attention as one differentiable op ([`MoeBackend::moe_attention`]) whose backward
//! recomputes the scores instead of keeping them.
//!
//! Why: composed from tensor ops, attention keeps the whole `[B, H, S, S]` score, probability and
//! mask tensors of every layer alive until its backward pass — at Mixtral's 32 heads and 4096 tokens,
//! about 4 GiB per layer and row in bf16, more than a layer's weights. This op keeps only its inputs,
//! its output and one f32 log-sum-exp per query (`[B, H, S]`), the flash-attention bookkeeping, and
//! works through the queries a block at a time, so no more than one block's scores exist at once.
//! Per block, the products are, in half precision ([`uses_grouped_gemm`]), grouped GEMMs
//! ([`MoeBackend::moe_grouped_matmul`] and its weight gradient, one segment per key/value group: the
//! experts' tensor-core kernels on CubeCL backends, Burn matmuls elsewhere), in f32/f64 batched Burn
//! matmuls; and the softmax
//! (scale, causal/window mask, softmax, and in the backward pass the rebuilt probabilities and score
//! gradients) is
//! [`MoeBackend::moe_attention_softmax`] / [`MoeBackend::moe_attention_softmax_backward`]: one CubeCL
//! kernel each on CubeCL backends ([`kernels_cubecl::attention`]), tensor ops elsewhere. A backend may
//! also override the whole pair ([`MoeBackend::moe_attention`], [`MoeBackend::moe_attention_backward`]).
//!
//! Grouped-query heads are handled inside: keys and values come with their own (fewer) heads, and a
//! block's queries of one key/value group are multiplied as one matrix, so keys are never repeated
//! and their gradients come out already summed over the group. A block of queries only reads the keys
//! it can see (the causal prefix, cut further by a sliding window), which skips the masked half of
//! the products.

use std::ops::Range;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, DType, Int, Tensor, TensorPrimitive, backend::Backend};
pub use kernels_cubecl::SoftmaxBlock;

use crate::MoeBackend;
use crate::ops::{moe_grouped_matmul, uses_grouped_gemm};

/// Score elements (f32) one query block may hold: 2²⁶ = 256 MiB; 512 queries at 32 heads × 4096 keys.
const BLOCK_SCORE_ELEMENTS: usize = 1 << 26;

/// What one causal attention call computes: `softmax(scale · q·kᵀ + mask) · v`, where query `i` sees
/// key `j` iff `j ≤ i` and, with a window `w`, `i − w < j` (HF's sliding window).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CausalAttention {
    /// Multiplier of the scores (`1/√head_dim` in Mixtral).
    pub scale: f64,
    /// Sliding window `w`, if any.
    pub window: Option<usize>,
    /// Queries per block; `None` picks the largest block whose scores stay under 256 MiB of f32.
    pub query_block: Option<usize>,
}

impl CausalAttention {
    /// Full causal attention with the usual `1/√head_dim` scale and automatic blocks.
    pub fn new(head_dim: usize) -> Self {
        Self { scale: (head_dim as f64).powf(-0.5), window: None, query_block: None }
    }

    /// With a sliding window (`None`: full causal).
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window;
        self
    }

    /// With a fixed number of queries per block (`None`: automatic).
    pub fn with_query_block(mut self, block: Option<usize>) -> Self {
        self.query_block = block;
        self
    }

    /// Queries per block for `heads` heads of `batch` rows over `seq` keys.
    fn block(&self, batch: usize, heads: usize, seq: usize) -> usize {
        let auto = BLOCK_SCORE_ELEMENTS / (batch * heads * seq).max(1);
        self.query_block.unwrap_or(auto).clamp(1, seq.max(1))
    }

    /// The query blocks of a sequence, each with the key range its queries can see.
    fn blocks(&self, batch: usize, heads: usize, seq: usize) -> Vec<(Range<usize>, Range<usize>)> {
        let block = self.block(batch, heads, seq);
        (0..seq)
            .step_by(block)
            .map(|r0| {
                let r1 = (r0 + block).min(seq);
                // The block's first query sees keys from r0 − w + 1; later ones see fewer old keys.
                let k0 = self.window.map_or(0, |w| (r0 + 1).saturating_sub(w));
                (r0..r1, k0..r1)
            })
            .collect()
    }
}

/// Shapes of one call, checked once, and the dtype of its softmax statistics and gradient sums.
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    /// [`stats_dtype`] of the inputs.
    stats: DType,
    /// Whether the products run as grouped GEMMs rather than batched Burn matmuls
    /// ([`uses_grouped_gemm`] of the inputs' dtype).
    grouped_gemm: bool,
}

impl Dims {
    fn of<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>) -> Self {
        let ([batch, heads, seq, head_dim], kd, vd) = (q.dims(), k.dims(), v.dims());
        let kv_heads = kd[1];
        assert!(
            kd == vd && kd[0] == batch && kd[2] == seq && kd[3] == head_dim && kv_heads > 0 && heads % kv_heads == 0,
            "causal attention: keys {kd:?} and values {vd:?} must be [{batch}, KV, {seq}, {head_dim}] with KV dividing the {heads} query heads (queries {:?})",
            q.dims()
        );
        Self { batch, heads, kv_heads, seq, head_dim, stats: stats_dtype(q.dtype()), grouped_gemm: uses_grouped_gemm(q.dtype()) }
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// A block of rows of a `[B, H, S, hd]` tensor, with each key/value group's query heads stacked
    /// into one matrix: `[B, KV, G·rows, hd]` (query head `kv·G + g`, as HF's `repeat_kv`).
    fn grouped<B: Backend>(&self, t: &Tensor<B, 4>, rows: &Range<usize>) -> Tensor<B, 4> {
        let (b, kv, g, hd) = (self.batch, self.kv_heads, self.group(), self.head_dim);
        t.clone().slice([0..b, 0..self.heads, rows.clone(), 0..hd]).reshape([b, kv, g * rows.len(), hd])
    }

    /// Rows `keys` of a `[B, KV, S, hd]` key or value tensor.
    fn keys<B: Backend>(&self, t: &Tensor<B, 4>, keys: &Range<usize>) -> Tensor<B, 4> {
        t.clone().slice([0..self.batch, 0..self.kv_heads, keys.clone(), 0..self.head_dim])
    }

    /// A block's raw scores `q_c·k_cᵀ` in the inputs' dtype (`q_c` the block's [`grouped`](Self::grouped)
    /// queries, `k_c` its [`keys`](Self::keys)), one row per (batch, head, query) — `[B·KV·G·rows, keys]`
    /// — and what the softmax kernels need to know of them.
    fn scores<B: MoeBackend>(
        &self,
        spec: &CausalAttention,
        q_c: Tensor<B, 4>,
        k_c: Tensor<B, 4>,
        rows: &Range<usize>,
        keys: &Range<usize>,
    ) -> (Tensor<B, 2>, SoftmaxBlock) {
        let block = SoftmaxBlock {
            rows: self.batch * self.heads * rows.len(),
            keys: keys.len(),
            queries: rows.len(),
            first_query: rows.start,
            first_key: keys.start,
            scale: spec.scale,
            window: spec.window,
        };
        (self.nt(q_c, k_c), block)
    }

    /// `a · bᵀ` per key/value group: `a` `[B, KV, G·rows, hd]` (grouped queries or output
    /// gradients), `b` `[B, KV, keys, hd]` → one row per score, `[B·KV·G·rows, keys]`.
    fn nt<B: MoeBackend>(&self, a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 2> {
        let [_, _, n, hd] = a.dims();
        let keys = b.dims()[2];
        if self.grouped_gemm {
            return moe_grouped_matmul(a.reshape([self.groups() * n, hd]), self.per_group(b), &self.offsets(n), true);
        }
        a.matmul(b.swap_dims(2, 3)).reshape([self.groups() * n, keys])
    }

    /// `p · b` per key/value group: `p` `[B·KV·G·rows, keys]`, `b` `[B, KV, keys, hd]` →
    /// `[B, KV, G·rows, hd]`.
    fn nn<B: MoeBackend>(&self, p: Tensor<B, 2>, b: Tensor<B, 4>) -> Tensor<B, 4> {
        let [rows, keys] = p.dims();
        let n = rows / self.groups();
        let hd = b.dims()[3];
        if self.grouped_gemm {
            return moe_grouped_matmul(p, self.per_group(b), &self.offsets(n), false).reshape([self.batch, self.kv_heads, n, hd]);
        }
        p.reshape([self.batch, self.kv_heads, n, keys]).matmul(b)
    }

    /// `pᵀ · a` per key/value group, summed over the group's heads (the key and value gradients):
    /// `p` `[B·KV·G·rows, keys]`, `a` `[B, KV, G·rows, hd]` → `[B, KV, keys, hd]`.
    fn tn<B: MoeBackend>(&self, p: Tensor<B, 2>, a: Tensor<B, 4>) -> Tensor<B, 4> {
        let [rows, keys] = p.dims();
        let [_, _, n, hd] = a.dims();
        if self.grouped_gemm {
            let a = a.reshape([rows, hd]).into_primitive().tensor();
            let out = B::moe_grouped_matmul_weight_grad(p.into_primitive().tensor(), a, &self.offsets(n));
            return float::<B, 3>(out).reshape([self.batch, self.kv_heads, keys, hd]);
        }
        p.reshape([self.batch, self.kv_heads, n, keys]).swap_dims(2, 3).matmul(a)
    }

    /// Key/value groups of the call, `B·KV`: the segments of the grouped GEMMs.
    fn groups(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// A `[B, KV, keys, hd]` block of keys or values as one matrix per group, `[B·KV, keys, hd]`.
    fn per_group<B: Backend>(&self, t: Tensor<B, 4>) -> Tensor<B, 3> {
        let [_, _, n, hd] = t.dims();
        t.reshape([self.groups(), n, hd])
    }

    /// Row offsets of the groups when each holds `n` rows (its `G` heads' queries of the block).
    fn offsets(&self, n: usize) -> Vec<usize> {
        (0..=self.groups()).map(|i| i * n).collect()
    }
}

/// Causal attention, blocked over queries, from Burn tensor ops: the output and each query's f32
/// log-sum-exp of its scores (what [`attention_backward`] needs to rebuild the probabilities).
///
/// # Shapes
/// - `q`: `[B, H, S, hd]`, `k`, `v`: `[B, KV, S, hd]` (`KV` divides `H`) → `[B, H, S, hd]` and `[B, H, S]`
///
/// # Panics
/// If the shapes do not fit together.
pub fn attention_forward<B: MoeBackend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, spec: &CausalAttention) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let dims = Dims::of(&q, &k, &v);
    let (b, h, hd) = (dims.batch, dims.heads, dims.head_dim);
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (rows, keys) in spec.blocks(b, h, dims.seq) {
        let c = rows.len();
        let (scores, block) = dims.scores(spec, dims.grouped(&q, &rows), dims.keys(&k, &keys), &rows, &keys);
        let (probs, lse) = B::moe_attention_softmax(prim(scores), &block);
        outs.push(dims.nn(float::<B, 2>(probs), dims.keys(&v, &keys)).reshape([b, h, c, hd]));
        lses.push(float::<B, 1>(lse).reshape([b, h, c]));
    }
    (Tensor::cat(outs, 2), Tensor::cat(lses, 2))
}

/// Gradients of [`attention_forward`] for the output gradient `dout`, recomputing each block's
/// probabilities from the saved log-sum-exp: `dv = Pᵀ·dO`, `dS = P ⊙ (dO·vᵀ − rowsum(dO ⊙ O))`,
/// `dq = scale · dS·k`, `dk = scale · dSᵀ·q`. Key and value gradients are accumulated over the blocks
/// in f32 and returned in the inputs' dtype.
///
/// # Shapes
/// - as [`attention_forward`]; `out`, `dout`: `[B, H, S, hd]`, `lse`: `[B, H, S]` → `dq` `[B, H, S, hd]`,
///   `dk`, `dv` `[B, KV, S, hd]`
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<B: MoeBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    dout: Tensor<B, 4>,
    spec: &CausalAttention,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let dims = Dims::of(&q, &k, &v);
    let (b, h, kv, hd, s) = (dims.batch, dims.heads, dims.kv_heads, dims.head_dim, dims.seq);
    let dtype = q.dtype();
    let device = q.device();
    let mut dq = Vec::new();
    let mut dk = Tensor::<B, 4>::zeros([b, kv, s, hd], (&device, dims.stats));
    let mut dv = Tensor::<B, 4>::zeros([b, kv, s, hd], (&device, dims.stats));
    for (rows, keys) in spec.blocks(b, h, s) {
        let c = rows.len();
        // The block's queries and keys serve the recomputed scores and the gradients alike.
        let (q_c, k_c, v_c) = (dims.grouped(&q, &rows), dims.keys(&k, &keys), dims.keys(&v, &keys));
        let (scores, block) = dims.scores(spec, q_c.clone(), k_c.clone(), &rows, &keys);
        let lse_c = lse.clone().slice([0..b, 0..h, rows.clone()]).reshape([block.rows]);
        let d_o = dims.grouped(&dout, &rows);
        let o = dims.grouped(&out, &rows);
        // rowsum(dO ⊙ O) = Σ_j P_ij · dP_ij, the softmax's correction term.
        let correction = (d_o.clone().cast(dims.stats) * o.cast(dims.stats)).sum_dim(3).reshape([block.rows]);
        let d_probs = dims.nt(d_o.clone(), v_c);
        let (probs, d_scores) =
            B::moe_attention_softmax_backward(prim(scores), prim(d_probs), prim(lse_c), prim(correction), &block);
        let dv_c = dims.tn(float::<B, 2>(probs), d_o);
        let d_scores = float::<B, 2>(d_scores);
        let dk_c = dims.tn(d_scores.clone(), q_c);
        dq.push(dims.nn(d_scores, k_c).reshape([b, h, c, hd]));
        let range = [0..b, 0..kv, keys.clone(), 0..hd];
        // The sums are formed before the assignment so the accumulator is not shared when it is
        // written (shared, the backends would copy all of it for every block).
        let dk_sum = dk.clone().slice(range.clone()) + dk_c.cast(dims.stats);
        dk = dk.slice_assign(range.clone(), dk_sum);
        let dv_sum = dv.clone().slice(range.clone()) + dv_c.cast(dims.stats);
        dv = dv.slice_assign(range, dv_sum);
    }
    (Tensor::cat(dq, 2), dk.cast(dtype), dv.cast(dtype))
}

/// [`MoeBackend::moe_attention`] on tensors: causal attention whose backward pass (under `Autodiff`)
/// recomputes the scores block by block instead of keeping them.
///
/// # Shapes
/// - `q`: `[B, H, S, hd]`, `k`, `v`: `[B, KV, S, hd]` (`KV` divides `H`) → `[B, H, S, hd]`
///
/// # Panics
/// If the shapes do not fit together.
pub fn causal_attention<B: MoeBackend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, spec: &CausalAttention) -> Tensor<B, 4> {
    let _ = Dims::of(&q, &k, &v);
    let (out, _lse) = B::moe_attention(prim(q), prim(k), prim(v), spec);
    float(out)
}

/// The default of [`MoeBackend::moe_attention_softmax`] from tensor ops: the probabilities of a block
/// of raw scores (`[rows, keys]`, the scores' dtype) and the rows' log-sum-exps (`[rows]`, f32; f64
/// for f64 scores), the softmax taken in that statistics dtype as HF's eager attention does.
pub fn attention_softmax_ops<B: Backend>(scores: Tensor<B, 2>, block: &SoftmaxBlock) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let dtype = scores.dtype();
    let scores = masked_scores(scores, block);
    // Every query sees at least itself, so the row maximum is finite.
    let max = scores.clone().max_dim(2);
    let exp = (scores - max.clone()).exp();
    let sum = exp.clone().sum_dim(2);
    let probs = (exp / sum.clone()).cast(dtype).reshape([block.rows, block.keys]);
    (probs, (max + sum.log()).reshape([block.rows]))
}

/// The default of [`MoeBackend::moe_attention_softmax_backward`] from tensor ops: the probabilities
/// rebuilt from the log-sum-exps, and the score gradients `scale · p · (dprobs − correction)`, both in
/// the scores' dtype.
pub fn attention_softmax_backward_ops<B: Backend>(
    scores: Tensor<B, 2>,
    dprobs: Tensor<B, 2>,
    lse: Tensor<B, 1>,
    correction: Tensor<B, 1>,
    block: &SoftmaxBlock,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let dtype = scores.dtype();
    let scores = masked_scores(scores, block);
    let ([heads, _, _], stats) = (scores.dims(), scores.dtype());
    let per_row = |t: Tensor<B, 1>| t.reshape([heads, block.queries, 1]);
    let probs = (scores - per_row(lse)).exp();
    let dprobs = dprobs.reshape([heads, block.queries, block.keys]).cast(stats);
    let d_scores = (probs.clone() * (dprobs - per_row(correction))).mul_scalar(block.scale);
    let back = |t: Tensor<B, 3>| t.cast(dtype).reshape([block.rows, block.keys]);
    (back(probs), back(d_scores))
}

/// A block's scores scaled, in the statistics dtype (f32, f64 for f64), `−∞` where the query does not
/// see the key: `[rows / queries, queries, keys]`.
fn masked_scores<B: Backend>(scores: Tensor<B, 2>, block: &SoftmaxBlock) -> Tensor<B, 3> {
    let stats = stats_dtype(scores.dtype());
    let heads = block.rows / block.queries.max(1);
    let shape = [heads, block.queries, block.keys];
    let mask = block_mask::<B>(block, &scores.device()).reshape([1, block.queries, block.keys]).expand(shape);
    scores.reshape(shape).cast(stats).mul_scalar(block.scale).mask_fill(mask, f32::NEG_INFINITY)
}

/// The dtype of softmax statistics and gradient sums for activations of `dtype`: f32 for half
/// precision and f32 (as HF's eager attention), f64 for f64.
fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 { DType::F64 } else { DType::F32 }
}

/// `true` where a query of the block must not see a key: `[queries, keys]`, built on the device.
fn block_mask<B: Backend>(block: &SoftmaxBlock, device: &B::Device) -> Tensor<B, 2, Bool> {
    let shape = [block.queries, block.keys];
    let (q0, k0) = (block.first_query as i64, block.first_key as i64);
    let row = Tensor::<B, 1, Int>::arange(q0..q0 + block.queries as i64, device).reshape([block.queries, 1]).expand(shape);
    let col = Tensor::<B, 1, Int>::arange(k0..k0 + block.keys as i64, device).reshape([1, block.keys]).expand(shape);
    // distance = query − key: negative is the future, ≥ w is outside the window.
    let distance = row - col;
    let future = distance.clone().lower_elem(0);
    match block.window {
        Some(w) => future.bool_or(distance.greater_equal_elem(w as i64)),
        None => future,
    }
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}
