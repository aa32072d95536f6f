use burn::module::{Module, Param};
use burn::nn::{Embedding, Initializer};
use burn::tensor::{Int, Tensor, backend::Backend};
use burn_moe_backend::{DMoeConfig, MoeAuxStats, load_balancing_loss};

use super::attention::MixtralAttention;
use super::decoder::DecoderLayer;
use super::linear::HfLinear;
use super::loss::causal_lm_loss;
use super::rms_norm::RmsNorm;
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
    /// A model with fresh weights: `N(0, initializer_range²)` for matrices, unit norms.
    ///
    /// # Panics
    /// When [`validate`](Self::validate) fails: build user-supplied configs through
    /// [`MixtralConfig::from_hf_json_file`] or call `validate` first to get an error instead.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MixtralForCausalLM<B> {
        if let Err(e) = self.validate("MixtralConfig::init") {
            panic!("{e}");
        }
        let (d, hd, std) = (self.hidden_size, self.head_dim(), self.initializer_range);
        let normal = Initializer::Normal { mean: 0.0, std };
        let moe = DMoeConfig::new(d, self.intermediate_size, self.num_local_experts, self.num_experts_per_tok)
            .with_kernel(self.moe_kernel)
            .with_initializer(normal.clone());
        let layers = (0..self.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: MixtralAttention {
                    q_proj: HfLinear::init(d, self.num_attention_heads * hd, std, device),
                    k_proj: HfLinear::init(d, self.num_key_value_heads * hd, std, device),
                    v_proj: HfLinear::init(d, self.num_key_value_heads * hd, std, device),
                    o_proj: HfLinear::init(self.num_attention_heads * hd, d, std, device),
                    num_heads: self.num_attention_heads,
                    num_kv_heads: self.num_key_value_heads,
                    head_dim: hd,
                    rope_theta: self.rope_theta,
                    sliding_window: self.sliding_window,
                },
                mlp: moe.init(device),
                input_layernorm: RmsNorm::init(d, self.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::init(d, self.rms_norm_eps, device),
            })
            .collect();
        MixtralForCausalLM {
            model: MixtralModel {
                embed_tokens: Embedding { weight: normal.init([self.vocab_size, d], device) },
                layers,
                norm: RmsNorm::init(d, self.rms_norm_eps, device),
            },
            lm_head: HfLinear::init(d, self.vocab_size, std, device),
            router_aux_loss_coef: self.router_aux_loss_coef,
        }
    }
}

impl<B: Backend> MixtralForCausalLM<B> {
    /// Logits and MoE statistics for a batch of token ids.
    ///
    /// # Shapes
    /// - `input_ids`: `[B, S]` → logits `[B, S, V]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> ModelOutput<B> {
        let mut h = self.model.embed_tokens.forward(input_ids);
        let mut aux = Vec::with_capacity(self.model.layers.len());
        for layer in &self.model.layers {
            let (next, stats) = layer.forward(h);
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
        let ModelOutput { logits, aux } = self.forward(input_ids);
        let (lm_loss_sum, num_target_tokens) = causal_lm_loss(logits.clone(), labels);
        let lm_loss = lm_loss_sum.clone() / num_target_tokens.clone().clamp_min(1.0);
        let aux_loss = load_balancing_loss(&aux);
        let loss = lm_loss.clone() + aux_loss.clone().mul_scalar(self.router_aux_loss_coef);
        CausalLmOutput { logits, loss, lm_loss, aux_loss, lm_loss_sum, num_target_tokens, aux }
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.num_params()
    }

    /// The parameters of an embedding, for checkpoint code.
    pub(crate) fn embedding_from(weight: Tensor<B, 2>) -> Embedding<B> {
        Embedding { weight: Param::from_tensor(weight) }
    }
}
