//! Attaching LoRA adapters to a Mixtral model from outside: the model type is unchanged, adapters are
//! the `Option` fields of [`HfLinear`](super::HfLinear) and [`DMoe`].

use burn::tensor::backend::Backend;
use burn_moe_backend::LoraConfig;
use serde::{Deserialize, Serialize};

use super::causal_lm::MixtralForCausalLM;

/// Which projections get adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraTargets {
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj` of every layer.
    AttnOnly,
    /// The attention projections and every expert's `w1`, `w2`, `w3` (never the router).
    All,
}

impl LoraTargets {
    /// PEFT `target_modules` names.
    pub fn module_names(self) -> &'static [&'static str] {
        match self {
            LoraTargets::AttnOnly => &["q_proj", "k_proj", "v_proj", "o_proj"],
            LoraTargets::All => &["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
        }
    }
}

impl<B: Backend> MixtralForCausalLM<B> {
    /// Freezes every base parameter (`require_grad = false`: embeddings, norms, router, LM head and
    /// all projections, so an optimizer keeps no state for them) and attaches fresh adapters to the
    /// `targets`. Adapter `A`s come from host RNGs seeded from `seed` and the layer/module position
    /// (same adapters on every backend and rank); `B`s are zero, so outputs are unchanged until the
    /// adapters are trained.
    pub fn with_lora(self, config: &LoraConfig, targets: LoraTargets, seed: u64) -> Self {
        // Lazy-aware: a model loaded for a sharded run keeps its base weights unread until the plan cuts them.
        let mut model = burn_moe_backend::freeze(self);
        let sub = |layer: usize, module: u64| seed.wrapping_mul(1_000_003).wrapping_add(layer as u64 * 16 + module);
        model.model.layers = model
            .model
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, mut layer)| {
                let attn = &mut layer.self_attn;
                attn.q_proj = attn.q_proj.clone().with_lora(config, sub(i, 0));
                attn.k_proj = attn.k_proj.clone().with_lora(config, sub(i, 1));
                attn.v_proj = attn.v_proj.clone().with_lora(config, sub(i, 2));
                attn.o_proj = attn.o_proj.clone().with_lora(config, sub(i, 3));
                if targets == LoraTargets::All {
                    layer.mlp = layer.mlp.with_lora(config, sub(i, 4));
                }
                layer
            })
            .collect();
        model
    }

    /// Folds every adapter into its base weight and drops the adapters: the result computes the same
    /// function as the adapted model (without dropout) and is exported like any base model.
    pub fn merge_lora(mut self) -> Self {
        self.model.layers = self
            .model
            .layers
            .into_iter()
            .map(|mut layer| {
                let attn = &mut layer.self_attn;
                attn.q_proj = attn.q_proj.clone().merge_lora();
                attn.k_proj = attn.k_proj.clone().merge_lora();
                attn.v_proj = attn.v_proj.clone().merge_lora();
                attn.o_proj = attn.o_proj.clone().merge_lora();
                layer.mlp = layer.mlp.merge_lora();
                layer
            })
            .collect();
        self
    }

    /// Whether any adapter is attached.
    pub fn has_lora(&self) -> bool {
        self.model.layers.iter().any(|l| {
            let a = &l.self_attn;
            l.mlp.lora.is_some() || [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj].iter().any(|p| p.lora.is_some())
        })
    }
}
