use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::{Distribution, Int, Tensor, TensorData, backend::Backend};
use burn_moe_backend::{DMoe, LocalDispatcher, MoeAuxStats, MoeBackend, TokenDispatcher, TokenMask, load_balancing_loss};

use super::attention::{AttentionKernel, MixtralAttention};
use super::decoder::DecoderLayer;
use super::linear::HfLinear;
use super::loss::causal_lm_loss;
use super::rms_norm::RmsNorm;
use crate::checkpoint::LazyWeights;
use crate::config::MixtralConfig;

/// The decoder stack without the LM head (HF `MixtralModel`).
#[derive(Module, Debug)]
pub struct MixtralModel<B: Backend> {
    /// Token embedding `[V, D]`.
    pub embed_tokens: Embedding<B>,
    /// Decoder blocks.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
}

/// Mixtral with its LM head (HF `MixtralForCausalLM`).
#[derive(Module, Debug)]
pub struct MixtralForCausalLM<B: Backend> {
    /// The decoder stack.
    pub model: MixtralModel<B>,
    /// Output projection `[V, D]`.
    pub lm_head: HfLinear<B>,
    /// Weight of the load-balancing loss in [`CausalLmOutput::loss`].
    pub router_aux_loss_coef: f64,
}

/// Hidden states and the per-layer MoE statistics.
#[derive(Debug, Clone)]
pub struct ModelOutput<B: Backend> {
    /// `[B, S, V]` logits.
    pub logits: Tensor<B, 3>,
    /// One entry per MoE layer, in layer order.
    pub aux: Vec<MoeAuxStats<B>>,
}

/// Result of [`MixtralForCausalLM::forward_with_labels`].
#[derive(Debug, Clone)]
pub struct CausalLmOutput<B: Backend> {
    /// `[B, S, V]` logits.
    pub logits: Tensor<B, 3>,
    /// `lm_loss + router_aux_loss_coef · aux_loss`, `[1]`.
    pub loss: Tensor<B, 1>,
    /// Mean next-token cross-entropy over target tokens, `[1]`.
    pub lm_loss: Tensor<B, 1>,
    /// HF load-balancing loss over all layers, `[1]`.
    pub aux_loss: Tensor<B, 1>,
    /// Sum of token cross-entropies, `[1]` (for global normalisation).
    pub lm_loss_sum: Tensor<B, 1>,
    /// Number of target tokens, `[1]`.
    pub num_target_tokens: Tensor<B, 1>,
    /// Per-layer MoE statistics (expert load).
    pub aux: Vec<MoeAuxStats<B>>,
}

impl MixtralConfig {
    /// A model with fresh weights drawn by the backend's RNG: `N(0, initializer_range²)` for matrices,
    /// unit norms. Fast on any device; reproducible only if nothing else draws from that RNG
    /// concurrently (see [`init_seeded`](Self::init_seeded)).
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails: build user-supplied configs through
    /// [`MixtralConfig::from_hf_json_file`] or call `validate` first to get an error instead.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MixtralForCausalLM<B> {
        let std = self.initializer_range;
        self.build(device, self.num_local_experts, &mut Eager(|n| Tensor::random([n], Distribution::Normal(0.0, std), device)))
    }

    /// A model of this shape whose weights are zeros and whose MoE layers hold only `experts_held`
    /// experts (as `DMoe::local_experts` leaves them; the router stays whole): the skeleton an
    /// expert-parallel rank fills from its own checkpoint shards, without ever holding the other
    /// ranks' experts or drawing random numbers for weights it overwrites.
    ///
    /// # Panics
    /// As [`init`](Self::init), and when `experts_held` is 0 or more than `num_local_experts`.
    pub fn init_zeros<B: Backend>(&self, device: &B::Device, experts_held: usize) -> MixtralForCausalLM<B> {
        assert!(
            experts_held > 0 && experts_held <= self.num_local_experts,
            "experts_held {experts_held} outside 1..={}",
            self.num_local_experts
        );
        self.build(device, experts_held, &mut Eager(|n| Tensor::zeros([n], device)))
    }

    /// Like [`init`](Self::init), but the weights come from a host RNG seeded with `seed`, so the same
    /// seed gives the same model on every backend, in every thread and every process (data-parallel
    /// ranks, tests running concurrently). Burn's backend RNGs are process-global.
    ///
    /// # Panics
    /// As [`init`](Self::init).
    pub fn init_seeded<B: Backend>(&self, device: &B::Device, seed: u64) -> MixtralForCausalLM<B> {
        let mut rng = HostNormal::new(seed);
        let std = self.initializer_range as f32;
        self.build(
            device,
            self.num_local_experts,
            &mut Eager(|n| {
                let values: Vec<f32> = (0..n).map(|_| rng.sample() * std).collect();
                Tensor::from_data(TensorData::new(values, [n]), device)
            }),
        )
    }

    /// A model whose matrices are drawn only when first needed, and then only the piece a sharding
    /// plan asked for ([`LazyWeights::request_piece`]), like a lazily loaded checkpoint
    /// ([`HfCheckpoint::load_model_lazy`](crate::HfCheckpoint::load_model_lazy)). Why: a rank of a
    /// sharded run of a real-sized architecture must never hold the whole model, not even while it
    /// is being initialised (Mixtral-8x7B: 188 GB in f32, more than one GPU has).
    ///
    /// Each matrix has its own random stream, seeded from `seed` and its place in the model, so
    /// its values do not depend on which pieces are drawn, in what order, or by how many ranks:
    /// every rank count and every plan trains the same model. Drawing a piece draws the whole
    /// matrix and keeps the piece, so at most one whole matrix is held at a time. The values
    /// differ from [`init_seeded`](Self::init_seeded)'s (one stream over the whole model) and,
    /// with [`InitRng::Device`], between backends.
    ///
    /// # Panics
    /// As [`init`](Self::init).
    pub fn init_lazy<B: Backend>(&self, device: &B::Device, seed: u64, rng: InitRng) -> (MixtralForCausalLM<B>, LazyWeights) {
        let lazy = LazyWeights::default();
        let mut drawn = Drawn { lazy: &lazy, device, seed, std: self.initializer_range, rng, next: 0 };
        let model = self.build(device, self.num_local_experts, &mut drawn);
        (model, lazy)
    }

    /// Assembles the model with `held` experts per MoE layer, its matrices made by `weights` in
    /// parameter order.
    fn build<B: Backend>(&self, device: &B::Device, held: usize, weights: &mut impl Weights<B>) -> MixtralForCausalLM<B> {
        if let Err(e) = self.validate("MixtralConfig::init") {
            panic!("{e}");
        }
        let (d, f, e, hd) = (self.hidden_size, self.intermediate_size, self.num_local_experts, self.head_dim());
        let embed = weights.weight([self.vocab_size, d]);
        let mut layers = Vec::with_capacity(self.num_hidden_layers);
        for _ in 0..self.num_hidden_layers {
            let self_attn = MixtralAttention {
                q_proj: HfLinear::from_param(weights.weight([self.num_attention_heads * hd, d])),
                k_proj: HfLinear::from_param(weights.weight([self.num_key_value_heads * hd, d])),
                v_proj: HfLinear::from_param(weights.weight([self.num_key_value_heads * hd, d])),
                o_proj: HfLinear::from_param(weights.weight([d, self.num_attention_heads * hd])),
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim: hd,
                rope_theta: self.rope_theta,
                sliding_window: self.sliding_window,
                kernel: self.attention_kernel,
                query_block: None,
            };
            let gate = weights.weight([e, d]);
            let w1 = weights.weight([held, f, d]);
            let w3 = weights.weight([held, f, d]);
            let w2 = weights.weight([held, d, f]);
            layers.push(DecoderLayer {
                self_attn,
                mlp: DMoe::from_params(gate, w1, w3, w2, self.num_experts_per_tok, self.moe_kernel),
                input_layernorm: RmsNorm::init(d, self.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::init(d, self.rms_norm_eps, device),
            });
        }
        let lm_head = HfLinear::from_param(weights.weight([self.vocab_size, d]));
        MixtralForCausalLM {
            model: MixtralModel {
                embed_tokens: MixtralForCausalLM::<B>::embedding_from(embed),
                layers,
                norm: RmsNorm::init(d, self.rms_norm_eps, device),
            },
            lm_head,
            router_aux_loss_coef: self.router_aux_loss_coef,
        }
    }
}

/// Standard normal samples from SplitMix64 and the Box–Muller transform: a fixed algorithm (unlike
/// `rand`'s `StdRng`, which may change between versions), so a seed means the same weights forever.
struct HostNormal {
    state: u64,
    spare: Option<f32>,
}

impl HostNormal {
    fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x5DEE_CE66_D1CE_5EED, spare: None }
    }

    fn uniform(&mut self) -> f64 {
        let z = self.next_u64();
        // 53 random bits in (0, 1]: never 0, so the logarithm below is finite.
        ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn sample(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }
}

/// Where [`MixtralConfig::init_lazy`] draws its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitRng {
    /// SplitMix64 and Box–Muller on the host: the same weights on every backend, but slow for
    /// billions of weights (tiny and test models, CPU runs).
    Host,
    /// The backend's RNG, reseeded for each matrix: fast on a GPU (real-sized models); the same
    /// weights on every device of one backend, not across backends. It reseeds the backend's
    /// process-global RNG, so nothing else may draw from it concurrently.
    Device,
}

/// Makes the model's matrices for [`MixtralConfig::build`], in parameter order.
trait Weights<B: Backend> {
    /// A parameter of shape `shape`.
    fn weight<const D: usize>(&mut self, shape: [usize; D]) -> Param<Tensor<B, D>>;
}

/// Matrices made now: the closure returns `n` values for an `n`-element matrix.
struct Eager<F>(F);

impl<B: Backend, F: FnMut(usize) -> Tensor<B, 1>> Weights<B> for Eager<F> {
    fn weight<const D: usize>(&mut self, shape: [usize; D]) -> Param<Tensor<B, D>> {
        Param::from_tensor((self.0)(shape.iter().product()).reshape(shape))
    }
}

/// Matrices drawn lazily ([`MixtralConfig::init_lazy`]), each from its own stream.
struct Drawn<'a, B: Backend> {
    lazy: &'a LazyWeights,
    device: &'a B::Device,
    seed: u64,
    std: f64,
    rng: InitRng,
    /// The next matrix's place in the model.
    next: u64,
}

impl<B: Backend> Weights<B> for Drawn<'_, B> {
    fn weight<const D: usize>(&mut self, shape: [usize; D]) -> Param<Tensor<B, D>> {
        // One SplitMix64 step over (seed, place): well-separated seeds for neighbouring places.
        let stream = HostNormal::new(self.seed ^ self.next.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
        self.next += 1;
        let (numel, std, rng) = (shape.iter().product::<usize>(), self.std, self.rng);
        self.lazy.param_from(shape, self.device, move |device: &B::Device, elements: std::ops::Range<usize>| match rng {
            InitRng::Host => {
                let mut normal = HostNormal::new(stream);
                for _ in 0..elements.start {
                    normal.sample();
                }
                let values: Vec<f32> = elements.clone().map(|_| normal.sample() * std as f32).collect();
                Tensor::from_data(TensorData::new(values, [elements.len()]), device)
            }
            InitRng::Device => {
                B::seed(device, stream);
                let whole = Tensor::<B, 1>::random([numel], Distribution::Normal(0.0, std), device);
                if elements.len() == numel {
                    return whole;
                }
                // A slice is a view that keeps the whole matrix alive: copy the piece out. `whole`
                // outlives the product (also under a fusing backend, which runs it at the sync), so
                // the product cannot be written in place into the view.
                let piece = whole.clone().slice([elements]).mul_scalar(1.0);
                // A failed sync shows up at the next use of the piece; nothing to do about it here.
                let _ = B::sync(device);
                drop(whole);
                piece
            }
        })
    }
}

impl<B: MoeBackend> MixtralForCausalLM<B> {
    /// Logits and MoE statistics for a batch of token ids.
    ///
    /// # Shapes
    /// - `input_ids`: `[B, S]` → logits `[B, S, V]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> ModelOutput<B> {
        self.forward_masked(input_ids, None)
    }

    /// [`forward`](Self::forward) with the padding of a right-padded batch left out of the MoE
    /// load-balancing statistics. `real` is `[B·S]` row-major, `true` for real tokens. Under the causal
    /// mask, right padding never influences real tokens, so no attention mask is needed.
    pub fn forward_masked(&self, input_ids: Tensor<B, 2, Int>, real: Option<&[bool]>) -> ModelOutput<B> {
        self.forward_dispatched(input_ids, real, &LocalDispatcher)
    }

    /// [`forward_masked`](Self::forward_masked) with every MoE layer's experts computed by
    /// `dispatcher`: how expert parallelism is applied from outside (the model code stays
    /// single-device; see [`burn_moe_backend::AllToAllDispatcher`]).
    pub fn forward_dispatched(
        &self,
        input_ids: Tensor<B, 2, Int>,
        real: Option<&[bool]>,
        dispatcher: &dyn TokenDispatcher<B>,
    ) -> ModelOutput<B> {
        let device = input_ids.device();
        let mask = real.map(|flags| TokenMask::from_flags(flags, &device));
        let mut h = self.model.embed_tokens.forward(input_ids);
        let mut aux = Vec::with_capacity(self.model.layers.len());
        for layer in &self.model.layers {
            let (next, stats) = layer.forward_dispatched(h, mask.as_ref(), dispatcher);
            h = next;
            aux.push(stats);
        }
        let logits = self.lm_head.forward(self.model.norm.forward(h));
        ModelOutput { logits, aux }
    }

    /// Forward pass with HF's training loss: shifted cross-entropy over labels that are not
    /// [`IGNORE_INDEX`](super::IGNORE_INDEX), plus `router_aux_loss_coef` times the load-balancing loss.
    ///
    /// # Shapes
    /// - `input_ids`, `labels`: `[B, S]`
    pub fn forward_with_labels(&self, input_ids: Tensor<B, 2, Int>, labels: Tensor<B, 2, Int>) -> CausalLmOutput<B> {
        self.forward_with_labels_masked(input_ids, labels, None)
    }

    /// [`forward_with_labels`](Self::forward_with_labels) for a right-padded batch; `real` as in
    /// [`forward_masked`](Self::forward_masked) (HF's `attention_mask`).
    pub fn forward_with_labels_masked(
        &self,
        input_ids: Tensor<B, 2, Int>,
        labels: Tensor<B, 2, Int>,
        real: Option<&[bool]>,
    ) -> CausalLmOutput<B> {
        self.forward_with_labels_dispatched(input_ids, labels, real, &LocalDispatcher)
    }

    /// [`forward_with_labels_masked`](Self::forward_with_labels_masked) with the experts computed by
    /// `dispatcher` (see [`forward_dispatched`](Self::forward_dispatched)).
    pub fn forward_with_labels_dispatched(
        &self,
        input_ids: Tensor<B, 2, Int>,
        labels: Tensor<B, 2, Int>,
        real: Option<&[bool]>,
        dispatcher: &dyn TokenDispatcher<B>,
    ) -> CausalLmOutput<B> {
        let ModelOutput { logits, aux } = self.forward_dispatched(input_ids, real, dispatcher);
        let (lm_loss_sum, num_target_tokens) = causal_lm_loss(logits.clone(), labels);
        let lm_loss = lm_loss_sum.clone() / num_target_tokens.clone().clamp_min(1.0);
        let aux_loss = load_balancing_loss(&aux);
        let loss = lm_loss.clone() + aux_loss.clone().mul_scalar(self.router_aux_loss_coef);
        CausalLmOutput { logits, loss, lm_loss, aux_loss, lm_loss_sum, num_target_tokens, aux }
    }

}

impl<B: Backend> MixtralForCausalLM<B> {
    /// The model with every attention layer computing attention by `kernel`; `query_block` is the
    /// chunked kernel's queries per block (`None`: sized automatically). Weights are untouched.
    pub fn with_attention_kernel(mut self, kernel: AttentionKernel, query_block: Option<usize>) -> Self {
        for layer in &mut self.model.layers {
            layer.self_attn.kernel = kernel;
            layer.self_attn.query_block = query_block;
        }
        self
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        // From the shapes: Burn's `num_params` takes every value, which would read a lazily loaded
        // checkpoint whole.
        struct Count(usize);
        impl<B: Backend> burn::module::ModuleVisitor<B> for Count {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                self.0 += param.lazy_shape().num_elements();
            }
        }
        let mut count = Count(0);
        self.visit(&mut count);
        count.0
    }

    /// An embedding around a weight parameter (which may be lazy), for checkpoint code.
    pub(crate) fn embedding_from(weight: Param<Tensor<B, 2>>) -> Embedding<B> {
        Embedding { weight }
    }
}
