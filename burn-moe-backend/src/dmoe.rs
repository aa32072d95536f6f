//! The embeddable dropless MoE module: a top-k softmax router and stacked SwiGLU experts.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{DType, Int, Tensor, activation::softmax, backend::Backend};

use crate::aux::MoeAuxStats;
use crate::dispatch::{LocalDispatcher, TokenDispatcher};
use crate::kernel::MoeKernel;
use crate::lora::{DMoeLora, LoraConfig};
use crate::ops::{HostIndex, MoeBackend, moe_combine_host, moe_gate_logits, moe_dsd, moe_grouped_matmul, moe_permute_host, moe_sdd, moe_swiglu};
use crate::reference;

/// Default block size of [`MoeKernel::BlockSparse`]: MegaBlocks' 128, the tile size GPUs like.
/// Small layers waste less padding with 16 or 32 (see [`DMoe::with_block_size`]).
pub const DEFAULT_BLOCK_SIZE: usize = 128;

/// Configuration of a [`DMoe`] layer.
#[derive(Config, Debug)]
pub struct DMoeConfig {
    /// Model (input and output) width `D`.
    pub d_model: usize,
    /// Hidden width of each expert's SwiGLU `F`.
    pub d_ff: usize,
    /// Number of experts `E`.
    pub num_experts: usize,
    /// Experts per token `k` (1 ≤ k ≤ E).
    pub top_k: usize,
    /// Which implementation computes the experts.
    #[config(default = "MoeKernel::Reference")]
    pub kernel: MoeKernel,
    /// Block size of [`MoeKernel::BlockSparse`] (rows per expert are padded to a multiple of it, and
    /// so is `F` inside the sparse layout); ignored by the other kernels.
    #[config(default = "DEFAULT_BLOCK_SIZE")]
    pub block_size: usize,
    /// Initializer of the router and expert weights (fan-in is the input width of each matrix).
    #[config(default = "Initializer::KaimingUniform{gain:1.0/3.0f64.sqrt(), fan_out_only:false}")]
    pub initializer: Initializer,
}

/// Dropless mixture of SwiGLU experts with a softmax top-k router.
///
/// Routing follows transformers 5.x `MixtralTopKRouter`: `logits = x · gateᵀ`, softmax over all
/// experts, top-k, then the k probabilities are renormalised to sum to one. Each expert computes
/// `w2 · (silu(w1 · x) ⊙ (w3 · x))`, and a token's output is the weighted sum over its experts.
///
/// Weights are stored stacked per expert in the PyTorch `[out, in]` convention.
///
/// # Shapes
/// - `gate`: `[E, D]`
/// - `w1`, `w3`: `[E, F, D]`
/// - `w2`: `[E, D, F]`
#[derive(Module, Debug)]
pub struct DMoe<B: Backend> {
    /// Router weight `[E, D]`.
    pub gate: Param<Tensor<B, 2>>,
    /// Gate projections `[E, F, D]`.
    pub w1: Param<Tensor<B, 3>>,
    /// Up projections `[E, F, D]`.
    pub w3: Param<Tensor<B, 3>>,
    /// Down projections `[E, D, F]`.
    pub w2: Param<Tensor<B, 3>>,
    /// Experts per token.
    pub top_k: usize,
    /// Expert-computation path.
    #[module(skip)]
    pub kernel: MoeKernel,
    /// Block size of [`MoeKernel::BlockSparse`].
    #[module(skip)]
    pub block_size: usize,
    /// Optional LoRA adapters of `w1`, `w3`, `w2` (see [`with_lora`](DMoe::with_lora)).
    pub lora: Option<DMoeLora<B>>,
}

/// The router's decisions for a batch of tokens.
///
/// # Shapes
/// - `logits`, `probs`: `[T, E]`
/// - `weights`: `[T, k]` (renormalised top-k probabilities, differentiable)
/// - `experts`: `[T, k]` (expert index of each slot)
#[derive(Debug, Clone)]
pub struct RouterOutput<B: Backend> {
    /// Raw router logits.
    pub logits: Tensor<B, 2>,
    /// Softmax over all experts, in f32 whatever the activations' dtype.
    pub probs: Tensor<B, 2>,
    /// Combine weights of the selected experts, in the activations' dtype.
    pub weights: Tensor<B, 2>,
    /// Selected experts, in descending probability order.
    pub experts: Tensor<B, 2, Int>,
}

/// Result of [`DMoe::forward`].
#[derive(Debug, Clone)]
pub struct MoeOutput<B: Backend> {
    /// Layer output `[T, D]`.
    pub output: Tensor<B, 2>,
    /// Router logits `[T, E]`.
    pub router_logits: Tensor<B, 2>,
    /// Load-balancing statistics (aux loss via [`MoeAuxStats::loss`]; per-expert token counts).
    pub aux: MoeAuxStats<B>,
}

impl DMoeConfig {
    /// Creates a layer with freshly initialised weights.
    ///
    /// # Panics
    /// When `top_k` is 0 or larger than `num_experts`, or a width or the block size is 0: these are
    /// programming errors in the caller's config (model loaders validate user configs before they get
    /// here).
    pub fn init<B: Backend>(&self, device: &B::Device) -> DMoe<B> {
        assert!(self.block_size > 0, "block_size must be positive");
        assert!(
            self.top_k >= 1 && self.top_k <= self.num_experts,
            "top_k {} must be in 1..={} (num_experts)",
            self.top_k,
            self.num_experts
        );
        assert!(self.d_model > 0 && self.d_ff > 0, "d_model and d_ff must be positive");
        let (e, d, f) = (self.num_experts, self.d_model, self.d_ff);
        let init = |shape: Vec<usize>, fan_in: usize, fan_out: usize| {
            self.initializer.init_with::<B, 3, _>(shape, Some(fan_in), Some(fan_out), device)
        };
        DMoe {
            gate: self.initializer.init_with([e, d], Some(d), Some(e), device),
            w1: init(vec![e, f, d], d, f),
            w3: init(vec![e, f, d], d, f),
            w2: init(vec![e, d, f], f, d),
            top_k: self.top_k,
            kernel: self.kernel,
            block_size: self.block_size,
            lora: None,
        }
    }
}

impl<B: Backend> DMoe<B> {
    /// Builds a layer from existing weights (e.g. a checkpoint).
    ///
    /// # Shapes
    /// - `gate`: `[E, D]`, `w1`/`w3`: `[E, F, D]`, `w2`: `[E, D, F]`
    pub fn from_weights(
        gate: Tensor<B, 2>,
        w1: Tensor<B, 3>,
        w3: Tensor<B, 3>,
        w2: Tensor<B, 3>,
        top_k: usize,
        kernel: MoeKernel,
    ) -> Self {
        Self::from_params(Param::from_tensor(gate), Param::from_tensor(w1), Param::from_tensor(w3), Param::from_tensor(w2), top_k, kernel)
    }

    /// Like [`from_weights`](Self::from_weights), from parameters (which may be lazy: read from a
    /// checkpoint only when first used).
    pub fn from_params(
        gate: Param<Tensor<B, 2>>,
        w1: Param<Tensor<B, 3>>,
        w3: Param<Tensor<B, 3>>,
        w2: Param<Tensor<B, 3>>,
        top_k: usize,
        kernel: MoeKernel,
    ) -> Self {
        Self { gate, w1, w3, w2, top_k, kernel, block_size: DEFAULT_BLOCK_SIZE, lora: None }
    }

    /// Sets the block size of [`MoeKernel::BlockSparse`] (default [`DEFAULT_BLOCK_SIZE`]).
    ///
    /// # Panics
    /// When `block_size` is 0 (a programming error, like a zero width in [`DMoeConfig`]).
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        self.block_size = block_size;
        self
    }

    /// Freezes the base weights (router included: `require_grad = false`, so an optimizer keeps no
    /// state for them) and attaches fresh LoRA adapters to `w1`, `w3` and `w2`, whose `A` is drawn
    /// from a host RNG seeded with `seed` and whose `B` is zero: the output is unchanged until the
    /// adapters are trained. The router is not adapted.
    pub fn with_lora(self, config: &LoraConfig, seed: u64) -> Self {
        // Shapes and device without reading the weights: they may still be lazy (a checkpoint
        // loaded for a sharded run reads them only when the plan has cut them).
        let [e, f, d] = self.w1.lazy_shape().dims();
        let device = self.w1.lazy_device();
        let mut frozen = crate::lora::freeze(self);
        frozen.lora = Some(DMoeLora::init(config, e, d, f, seed, &device));
        frozen
    }

    /// Folds the adapters into the expert weights (`W[e] + s·B[e]·A[e]`) and drops them.
    pub fn merge_lora(self) -> Self {
        let Some(l) = &self.lora else { return self };
        let merge = |w: &Param<Tensor<B, 3>>, a: &crate::lora::ExpertLora<B>| {
            // Detached: the merged weight is a new leaf (under autodiff, a sum is not one). In the
            // adapter's dtype: under mixed precision the frozen base is stored in the compute dtype
            // (bf16) and the trained adapter in f32; a sum of the two without the cast is not
            // defined (on burn-cuda it produced unrelated values, found by the real-shape export run).
            let delta = a.delta_weight();
            Param::from_tensor((w.val().cast(delta.dtype()) + delta).detach())
        };
        Self {
            gate: Param::from_tensor(self.gate.val().detach()),
            w1: merge(&self.w1, &l.w1),
            w3: merge(&self.w3, &l.w3),
            w2: merge(&self.w2, &l.w2),
            top_k: self.top_k,
            kernel: self.kernel,
            block_size: self.block_size,
            lora: None,
        }
    }

    /// Block size of [`MoeKernel::BlockSparse`].
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.gate.dims()[0]
    }
}

impl<B: MoeBackend> DMoe<B> {
    /// Routes tokens: softmax over all experts, top-k, renormalise.
    ///
    /// # Shapes
    /// - `x`: `[T, D]`
    pub fn route(&self, x: Tensor<B, 2>) -> RouterOutput<B> {
        let dtype = x.dtype();
        let logits = moe_gate_logits(x, self.gate.val());
        // As HF: the softmax, the choice and the normalisation in f32 (bf16 probabilities would
        // tie and flip the top-k), the combine weights rounded back to the activations' dtype.
        let probs = softmax(logits.clone().cast(DType::F32), 1);
        // The choice of experts is not differentiable; the weights are, through `gather`.
        let experts = top_k_indices(probs.clone().detach(), self.top_k);
        let top = probs.clone().gather(1, experts.clone());
        let weights = (top.clone() / top.sum_dim(1)).cast(dtype);
        RouterOutput { logits, probs, weights, experts }
    }

    /// Applies the layer to a flat batch of tokens.
    ///
    /// # Shapes
    /// - `x`: `[T, D]` → `output`: `[T, D]`
    pub fn forward(&self, x: Tensor<B, 2>) -> MoeOutput<B> {
        self.forward_masked(x, None)
    }

    /// [`forward`](Self::forward) where `mask` leaves padding tokens out of the load-balancing
    /// statistics (as transformers does with an `attention_mask`). Padding is still routed and
    /// computed, so outputs are the same as without a mask.
    ///
    /// # Shapes
    /// - `x`: `[T, D]`; `mask.weights`: `[T]`
    pub fn forward_masked(&self, x: Tensor<B, 2>, mask: Option<&TokenMask<B>>) -> MoeOutput<B> {
        self.forward_dispatched(x, mask, &LocalDispatcher)
    }

    /// [`forward_masked`](Self::forward_masked) with the expert computation done by `dispatcher`
    /// (e.g. [`AllToAllDispatcher`](crate::AllToAllDispatcher) for expert parallelism, where this
    /// layer holds only its rank's experts). Routing and statistics are the same for any dispatcher.
    ///
    /// # Shapes
    /// - `x`: `[T, D]`; `mask.weights`: `[T]`
    pub fn forward_dispatched(
        &self,
        x: Tensor<B, 2>,
        mask: Option<&TokenMask<B>>,
        dispatcher: &dyn TokenDispatcher<B>,
    ) -> MoeOutput<B> {
        let [rows, _] = x.dims();
        let num_experts = self.num_experts();
        let route = self.route(x.clone());
        let device = x.device();
        let pairs = rows * self.top_k;
        let (slot_weights, probs, rows) = match mask {
            None => (Tensor::ones([pairs], (&device, route.probs.dtype())), route.probs.clone(), rows),
            Some(m) => {
                let w = m.weights.clone().cast(route.probs.dtype()).unsqueeze_dim::<2>(1);
                (w.clone().repeat_dim(1, self.top_k).reshape([pairs]), route.probs.clone() * w, m.valid)
            }
        };
        // Histogram on the device from an equality mask (Burn's `one_hot` reads its input back to the
        // host, and a scatter-add runs serially on burn-cubecl: 2 ms at 32768 pairs on an H200).
        let ids = Tensor::<B, 1, Int>::arange(0..num_experts as i64, &device).reshape([1, num_experts]).expand([pairs, num_experts]);
        let hits = route.experts.clone().reshape([pairs, 1]).expand([pairs, num_experts]).equal(ids);
        let token_counts = column_sums(hits.float().cast(slot_weights.dtype()) * slot_weights.reshape([pairs, 1]));
        let output = dispatcher.dispatch(self, x, route.weights, route.experts);
        let aux = MoeAuxStats { prob_sum: column_sums(probs), token_counts, rows };
        MoeOutput { output, router_logits: route.logits, aux }
    }
}

impl<B: MoeBackend> DMoe<B> {
    /// The expert computation (with the adapters, if any) for given routing decisions, on the
    /// layer's kernel: lets callers (and tests) force the routing.
    ///
    /// # Shapes
    /// - `x`: `[T, D]`, `weights`: `[T, k]`, `experts`: `[T, k]` (values in `0..E`) → `[T, D]`
    pub fn experts(&self, x: Tensor<B, 2>, weights: Tensor<B, 2>, experts: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let (w1, w3, w2) = (self.w1.val(), self.w3.val(), self.w2.val());
        let lora = self.lora.as_ref();
        match self.kernel {
            MoeKernel::Reference => reference::dropless_experts_lora(x, weights, experts, w1, w3, w2, lora),
            MoeKernel::Scatter => scatter_experts(x, weights, experts, w1, w3, w2, lora),
            MoeKernel::BlockSparse => block_sparse_experts(x, weights, experts, w1, w3, w2, self.block_size, lora),
        }
    }
}

impl<B: MoeBackend> DMoe<B> {
    /// The SwiGLU experts (with the adapters, if any) on rows already grouped by expert: segment `e`
    /// has `counts[e]` rows, in order, and is computed by this layer's expert `e`. What a dispatcher
    /// calls once the rows have reached the rank that holds their experts. Zero rows give `[0, D]`.
    ///
    /// # Shapes
    /// - `xs`: `[N, D]`, `counts`: `E_local` entries summing to `N` → `[N, D]`
    pub fn experts_grouped(&self, xs: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
        let [rows, _] = xs.dims();
        let (w1, w3, w2) = (self.w1.val(), self.w3.val(), self.w2.val());
        let lora = self.lora.as_ref();
        let mut offsets = Vec::with_capacity(counts.len() + 1);
        offsets.push(0);
        for &c in counts {
            offsets.push(offsets.last().copied().unwrap_or(0) + c);
        }
        if rows == 0 {
            // A function of the input all the same: the graph has the same shape on every rank.
            return xs;
        }
        match self.kernel {
            MoeKernel::Reference => reference::segment_experts(xs, &offsets, w1, w3, w2, lora),
            MoeKernel::Scatter => scatter_grouped(xs, &offsets, w1, w3, w2, lora),
            MoeKernel::BlockSparse => {
                let [_, d_ff, _] = w1.dims();
                let topology = kernels_cubecl::BlockSparseTopology::for_experts(counts, d_ff, self.block_size)
                    .expect("DMoe guarantees a positive block size and hidden width");
                let back = padded_positions(&offsets, topology.padded_offsets());
                let mut pad_rows = vec![PADDING; topology.rows()];
                for (pos, &p) in back.iter().enumerate() {
                    pad_rows[p as usize] = pos as i64;
                }
                let yp = block_sparse_padded(gather_padded(xs, pad_rows), &topology, w1, w3, w2, lora);
                moe_permute_host(yp, &HostIndex::from(back))
            }
        }
    }

    /// A copy holding only experts `range` (weights and adapters), for expert parallelism: the
    /// router keeps all `E` experts. Parameter ids are kept, so optimizer state follows.
    ///
    /// # Panics
    /// When `range` is empty or exceeds the experts held (a programming error of the sharding plan,
    /// which validates `ep_size` first).
    pub fn local_experts(&self, range: core::ops::Range<usize>) -> Self {
        self.local_experts_by(range.clone(), |p| slice_experts(p, range.clone()))
    }

    /// Like [`local_experts`](Self::local_experts), with `cut` taking the experts `range` out of
    /// each `[E, …]` parameter (weights and adapters): for a caller whose parameters can read only
    /// those experts themselves (a lazily loaded checkpoint), instead of reading all and slicing.
    ///
    /// # Panics
    /// As [`local_experts`](Self::local_experts).
    pub fn local_experts_by(&self, range: core::ops::Range<usize>, slice: impl Fn(&Param<Tensor<B, 3>>) -> Param<Tensor<B, 3>>) -> Self {
        let held = self.w1.lazy_shape()[0];
        assert!(range.start < range.end && range.end <= held, "expert range {range:?} outside 0..{held}");
        let lora = self.lora.as_ref().map(|l| {
            let part = |e: &crate::lora::ExpertLora<B>| crate::lora::ExpertLora {
                a: slice(&e.a),
                b: slice(&e.b),
                scaling: e.scaling,
                dropout: e.dropout.clone(),
            };
            DMoeLora { w1: part(&l.w1), w3: part(&l.w3), w2: part(&l.w2) }
        });
        Self {
            gate: self.gate.clone(),
            w1: slice(&self.w1),
            w3: slice(&self.w3),
            w2: slice(&self.w2),
            top_k: self.top_k,
            kernel: self.kernel,
            block_size: self.block_size,
            lora,
        }
    }
}

/// Experts `range` of a stacked `[E, …]` parameter, as a new leaf (a slice under autodiff is not one)
/// that keeps the parameter's id and trainability, in a buffer of its own (a slice is a view that
/// would keep every expert's memory alive).
pub fn slice_experts<B: Backend>(p: &Param<Tensor<B, 3>>, range: core::ops::Range<usize>) -> Param<Tensor<B, 3>> {
    let trainable = p.is_require_grad();
    p.clone().map(|t| crate::dist::owned_copy(t.detach().slice([range])).set_require_grad(trainable))
}

/// Which tokens of a flat batch are real (1) and which are padding (0), for the MoE statistics.
#[derive(Debug, Clone)]
pub struct TokenMask<B: Backend> {
    /// `[T]`, 1.0 for real tokens and 0.0 for padding.
    pub weights: Tensor<B, 1>,
    /// Number of real tokens.
    pub valid: usize,
}

impl<B: Backend> TokenMask<B> {
    /// Builds a mask from per-token flags.
    pub fn from_flags(flags: &[bool], device: &B::Device) -> Self {
        let values: Vec<f32> = flags.iter().map(|&f| if f { 1.0 } else { 0.0 }).collect();
        let weights = Tensor::from_data(burn::tensor::TensorData::new(values, [flags.len()]), device);
        Self { weights, valid: flags.iter().filter(|&&f| f).count() }
    }
}

/// The indices of each row's `k` largest values, largest first (ties: the lower index first, as
/// `torch.topk` gives them on the GPU), computed on the device by `k` rounds of argmax, each masking
/// the previous winner.
///
/// Why not Burn's `topk_with_indices`: on burn-cubecl it sorts on the host, so every MoE layer call
/// read its `[T, E]` probabilities back (a device sync) and sorted 16384 rows on one core.
///
/// # Shapes
/// - `probs`: `[T, E]` (values ≥ 0, `k ≤ E`) → `[T, k]`
fn top_k_indices<B: Backend>(probs: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    let [tokens, num_experts] = probs.dims();
    let device = probs.device();
    let ids = Tensor::<B, 1, Int>::arange(0..num_experts as i64, &device).reshape([1, num_experts]).expand([tokens, num_experts]);
    let mut rest = probs;
    let mut picks = Vec::with_capacity(k);
    for round in 0..k {
        let pick = rest.clone().argmax(1);
        if round + 1 < k {
            // Probabilities are ≥ 0, so −1 drops the winner out of the next rounds.
            let won = ids.clone().equal(pick.clone().expand([tokens, num_experts]));
            rest = rest.mask_fill(won, -1.0);
        }
        picks.push(pick);
    }
    Tensor::cat(picks, 1)
}

/// `x.sum_dim(0)` as `[C]`, in two stages: burn-cubecl reduces a tall, narrow matrix ([T, E]) over its
/// rows with one cube per few outputs (1.5 ms for [16384, 8] on an H200), so the rows are first
/// summed in chunks of 64 (many outputs), then the chunk sums.
///
/// # Shapes
/// - `x`: `[R, C]` → `[C]`
fn column_sums<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    const CHUNK: usize = 64;
    let [rows, cols] = x.dims();
    if rows <= CHUNK {
        return x.sum_dim(0).reshape([cols]);
    }
    let pad = rows.next_multiple_of(CHUNK) - rows;
    let x = if pad == 0 { x } else { Tensor::cat(vec![x.clone(), Tensor::zeros([pad, cols], (&x.device(), x.dtype()))], 0) };
    let chunks = (rows + pad) / CHUNK;
    x.reshape([chunks, CHUNK, cols]).sum_dim(1).reshape([chunks, cols]).sum_dim(0).reshape([cols])
}

/// The scatter path: permute → grouped matmuls (w1, w3) → SwiGLU → grouped matmul (w2) → combine.
///
/// # Shapes
/// As [`reference::dropless_experts`].
fn scatter_experts<B: MoeBackend>(
    x: Tensor<B, 2>,
    weights: Tensor<B, 2>,
    experts: Tensor<B, 2, Int>,
    w1: Tensor<B, 3>,
    w3: Tensor<B, 3>,
    w2: Tensor<B, 3>,
    lora: Option<&DMoeLora<B>>,
) -> Tensor<B, 2> {
    let device = x.device();
    let [tokens, d_model] = x.dims();
    let [num_experts, _, _] = w1.dims();
    if tokens == 0 {
        return Tensor::zeros([0, d_model], (&device, x.dtype()));
    }
    let plan = reference::host_routing_plan(experts, num_experts);
    let rows = HostIndex::from(plan.sorted_token.iter().map(|&t| t as i64).collect::<Vec<_>>());
    let slots = HostIndex::from(plan.slots().into_iter().map(|s| s as i64).collect::<Vec<_>>());
    let y = scatter_grouped(moe_permute_host(x, &rows), &plan.offsets, w1, w3, w2, lora);
    moe_combine_host(y, &slots, weights)
}

/// Grouped matmuls (w1, w3) → SwiGLU → grouped matmul (w2) on rows already grouped by expert.
///
/// # Shapes
/// - `xs`: `[N, D]`, `offsets`: `E + 1` entries ending at `N` → `[N, D]`
fn scatter_grouped<B: MoeBackend>(
    xs: Tensor<B, 2>,
    offsets: &[usize],
    w1: Tensor<B, 3>,
    w3: Tensor<B, 3>,
    w2: Tensor<B, 3>,
    lora: Option<&DMoeLora<B>>,
) -> Tensor<B, 2> {
    let mut gate = moe_grouped_matmul(xs.clone(), w1, offsets, true);
    let mut up = moe_grouped_matmul(xs.clone(), w3, offsets, true);
    if let Some(l) = lora {
        gate = gate + l.w1.delta_grouped(xs.clone(), offsets);
        up = up + l.w3.delta_grouped(xs, offsets);
    }
    let h = moe_swiglu(gate, up);
    let mut y = moe_grouped_matmul(h.clone(), w2, offsets, true);
    if let Some(l) = lora {
        y = y + l.w2.delta_grouped(h, offsets);
    }
    y
}

/// The MegaBlocks path: permute into expert order with each expert padded by zero rows to a multiple
/// of `block` → SDD (w1, w3) → SwiGLU on the nonzero blocks → DSD (w2) → combine (padding rows are
/// never read back).
///
/// # Shapes
/// As [`reference::dropless_experts`].
fn block_sparse_experts<B: MoeBackend>(
    x: Tensor<B, 2>,
    weights: Tensor<B, 2>,
    experts: Tensor<B, 2, Int>,
    w1: Tensor<B, 3>,
    w3: Tensor<B, 3>,
    w2: Tensor<B, 3>,
    block: usize,
    lora: Option<&DMoeLora<B>>,
) -> Tensor<B, 2> {
    let device = x.device();
    let [tokens, d_model] = x.dims();
    let [num_experts, d_ff, _] = w1.dims();
    if tokens == 0 {
        return Tensor::zeros([0, d_model], (&device, x.dtype()));
    }
    let plan = reference::host_routing_plan(experts, num_experts);
    let topology = kernels_cubecl::BlockSparseTopology::for_experts(&plan.counts, d_ff, block)
        .expect("DMoe guarantees a positive block size and hidden width");
    let mut rows = vec![PADDING; topology.rows()];
    let mut slots = vec![0i64; plan.sorted_flat.len()];
    for (pos, &p) in padded_positions(&plan.offsets, topology.padded_offsets()).iter().enumerate() {
        rows[p as usize] = plan.sorted_token[pos] as i64;
        slots[plan.sorted_flat[pos]] = p;
    }
    let y = block_sparse_padded(gather_padded(x, rows), &topology, w1, w3, w2, lora);
    moe_combine_host(y, &HostIndex::from(slots), weights)
}

/// For each row of the expert-sorted order (segments at `offsets`), its row in the block-sparse
/// layout, where segment `e` starts at `padded[e]` (both `E + 1` entries).
fn padded_positions(offsets: &[usize], padded: &[usize]) -> Vec<i64> {
    let mut out = Vec::with_capacity(offsets.last().copied().unwrap_or(0));
    for (seg, start) in offsets.windows(2).zip(padded) {
        out.extend((0..seg[1] - seg[0]).map(|r| (start + r) as i64));
    }
    out
}

/// The rows of `x` gathered into the block-sparse layout: padded row `p` is `x[rows[p]]`, or zeros
/// where `rows[p]` is [`PADDING`] (each padding row reads its own appended zero row, see
/// [`point_padding_at_zero_rows`]).
///
/// # Shapes
/// - `x`: `[N, D]`, `rows`: `Tp` entries → `[Tp, D]`
fn gather_padded<B: MoeBackend>(x: Tensor<B, 2>, mut rows: Vec<i64>) -> Tensor<B, 2> {
    let [real, d_model] = x.dims();
    let pads = point_padding_at_zero_rows(&mut rows, real);
    let zero_rows = Tensor::zeros([pads, d_model], (&x.device(), x.dtype()));
    moe_permute_host(Tensor::cat(vec![x, zero_rows], 0), &HostIndex::from(rows))
}

/// Marks a padding row in the gather index of the block-sparse layout (see [`point_padding_at_zero_rows`]).
const PADDING: i64 = -1;

/// Points every padding row ([`PADDING`]) of a block-sparse gather index at its own zero row, the
/// zero rows being appended after the `real` source rows; returns how many there are.
///
/// Why one zero row each rather than one shared: the gather's backward sums, per source row, every
/// row that read it, and that sum is as long as the most-read row for all rows
/// (`scatter_add_rows`). A shared zero row is read by every padding row (up to `E · (block − 1)`,
/// about 600 at Mixtral sizes), which made that backward take 10 ms at T = 4096 on an H200 (ncu,
/// 2026-11-29) against 0.2 ms with two sources per row.
fn point_padding_at_zero_rows(rows: &mut [i64], real: usize) -> usize {
    let mut next = real as i64;
    for r in rows.iter_mut().filter(|r| **r == PADDING) {
        *r = next;
        next += 1;
    }
    next as usize - real
}

/// SDD (w1, w3) → SwiGLU on the nonzero blocks → DSD (w2) on rows sorted by expert and padded per
/// expert to the topology's block size (padding rows zero).
///
/// # Shapes
/// - `xp`: `[Tp, D]` → `[Tp, D]`
fn block_sparse_padded<B: MoeBackend>(
    xp: Tensor<B, 2>,
    topology: &kernels_cubecl::BlockSparseTopology,
    w1: Tensor<B, 3>,
    w3: Tensor<B, 3>,
    w2: Tensor<B, 3>,
    lora: Option<&DMoeLora<B>>,
) -> Tensor<B, 2> {
    let device = xp.device();
    let x_dtype = xp.dtype();
    let [_, d_ff, _] = w1.dims();
    let block = topology.block();
    let padded = topology.padded_offsets();
    let mut gate = moe_sdd(xp.clone(), w1, topology, true);
    let mut up = moe_sdd(xp.clone(), w3, topology, true);
    // The adapters' deltas are grouped matmuls over the padded expert segments (padding rows are
    // zero, so their deltas are too), moved between the dense `[Tp, F]` rows and the block layout
    // `[nnz, bs, bs]` by reshapes: each expert owns whole block rows of `Fp / bs` blocks, in order.
    let (fp, cb) = (topology.ffn_padded(), topology.blocks_per_row());
    if let Some(l) = lora {
        let to_blocks = |dense: Tensor<B, 2>| {
            let [r, _] = dense.dims();
            let dense = if fp > d_ff {
                Tensor::cat(vec![dense, Tensor::zeros([r, fp - d_ff], (&device, x_dtype))], 1)
            } else {
                dense
            };
            dense.reshape([r / block, block, cb, block]).swap_dims(1, 2).reshape([r / block * cb, block, block])
        };
        gate = gate + to_blocks(l.w1.delta_grouped(xp.clone(), padded));
        up = up + to_blocks(l.w3.delta_grouped(xp, padded));
    }
    let h = burn::tensor::activation::silu(gate) * up;
    let mut y = moe_dsd(h.clone(), w2, topology, true);
    if let Some(l) = lora {
        let [nnz, _, _] = h.dims();
        let rb = nnz / cb;
        let dense = h.reshape([rb, cb, block, block]).swap_dims(1, 2).reshape([rb * block, cb * block]);
        let dense = dense.slice([0..rb * block, 0..d_ff]);
        y = y + l.w2.delta_grouped(dense, padded);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_indices_are_the_largest_first_lower_index_on_ties() {
        use burn::backend::NdArray;
        use burn::tensor::TensorData;
        let device = Default::default();
        let rows: Vec<Vec<f32>> = vec![
            vec![0.1, 0.4, 0.4, 0.1],
            vec![0.7, 0.05, 0.05, 0.2],
            vec![0.25, 0.25, 0.25, 0.25],
            vec![0.0, 0.0, 0.3, 0.7],
        ];
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let probs = Tensor::<NdArray<f32>, 2>::from_data(TensorData::new(flat, [4, 4]), &device);
        for k in 1..=4 {
            let got: Vec<i64> = top_k_indices(probs.clone(), k).into_data().iter::<i64>().collect();
            // Expected: a stable sort by value, descending (equal values keep index order).
            let want: Vec<i64> = rows
                .iter()
                .flat_map(|r| {
                    let mut idx: Vec<usize> = (0..r.len()).collect();
                    idx.sort_by(|&a, &b| r[b].partial_cmp(&r[a]).unwrap());
                    idx.into_iter().take(k).map(|i| i as i64)
                })
                .collect();
            assert_eq!(got, want, "k = {k}");
        }
    }

    #[test]
    fn sorted_rows_land_at_their_segments_padded_start() {
        // Segments of 2, 0 and 3 rows, padded to blocks of 4: starts 0, 4, 4 (the empty segment takes none).
        assert_eq!(padded_positions(&[0, 2, 2, 5], &[0, 4, 4, 8]), vec![0, 1, 4, 5, 6]);
        assert_eq!(padded_positions(&[0], &[0]), Vec::<i64>::new());
    }

    #[test]
    fn each_padding_row_reads_its_own_zero_row() {
        // Two real rows per expert segment of 4, sources 0..5 real: the four padding rows read 5..9.
        let mut rows = vec![3, 0, PADDING, PADDING, 4, 1, PADDING, PADDING];
        assert_eq!(point_padding_at_zero_rows(&mut rows, 5), 4);
        assert_eq!(rows, vec![3, 0, 5, 6, 4, 1, 7, 8]);
        let mut none = vec![1, 0];
        assert_eq!(point_padding_at_zero_rows(&mut none, 2), 0);
        assert_eq!(none, vec![1, 0]);
    }
}
