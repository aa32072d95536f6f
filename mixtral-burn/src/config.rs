//! Model configuration: Burn `Config` with presets, validation, and parsing of HF `config.json`.

use std::path::Path;

use burn::config::Config;
use burn_moe_backend::MoeKernel;

use crate::model::AttentionKernel;
use serde::Deserialize;

/// Configuration of a Mixtral model. Field names follow the HF `config.json`.
#[derive(Config, Debug, PartialEq)]
pub struct MixtralConfig {
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Model width `D`.
    pub hidden_size: usize,
    /// Expert hidden width `F`.
    pub intermediate_size: usize,
    /// Number of decoder layers `L`.
    pub num_hidden_layers: usize,
    /// Query heads `H`.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than `H`).
    pub num_key_value_heads: usize,
    /// Width of a head; `hidden_size / num_attention_heads` when absent.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    /// Longest sequence the model is meant for (RoPE tables are computed per call, so this is a limit
    /// checked on input, not a buffer size).
    #[config(default = 32768)]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[config(default = 1e6)]
    pub rope_theta: f64,
    /// Sliding attention window (a query sees keys `q - w < k ≤ q`); full causal when absent.
    #[config(default = "None")]
    pub sliding_window: Option<usize>,
    /// Experts per MoE layer `E`.
    pub num_local_experts: usize,
    /// Experts per token `k`.
    pub num_experts_per_tok: usize,
    /// Weight of the load-balancing loss in the total loss.
    #[config(default = 0.02)]
    pub router_aux_loss_coef: f64,
    /// Standard deviation of the normal initialisation of fresh weights.
    #[config(default = 0.02)]
    pub initializer_range: f64,
    /// Beginning-of-sequence token.
    #[config(default = "Some(1)")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[config(default = "Some(2)")]
    pub eos_token_id: Option<u32>,
    /// Expert-computation path of the MoE layers (not part of HF configs).
    #[config(default = "MoeKernel::Reference")]
    pub moe_kernel: MoeKernel,
    /// How the attention layers compute attention (not part of HF configs).
    #[config(default = "AttentionKernel::Eager")]
    pub attention_kernel: AttentionKernel,
}

/// A configuration that cannot describe a working model, or a `config.json` that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid JSON or a field has the wrong type.
    #[error("invalid config {path}: {source}")]
    Json {
        /// The file.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// A required field is missing.
    #[error("config {path} has no field `{field}`")]
    Missing {
        /// The file.
        path: String,
        /// The field.
        field: &'static str,
    },
    /// The values are inconsistent.
    #[error("invalid Mixtral config ({origin}): {message}")]
    Invalid {
        /// Where the config came from.
        origin: String,
        /// What is wrong, with the numbers.
        message: String,
    },
    /// A feature the model does not implement.
    #[error("unsupported Mixtral config ({origin}): {message}")]
    Unsupported {
        /// Where the config came from.
        origin: String,
        /// What is not supported.
        message: String,
    },
}

impl MixtralConfig {
    /// Mixtral-8x7B (`mistralai/Mixtral-8x7B-v0.1`).
    pub fn mixtral_8x7b() -> Self {
        Self::new(32000, 4096, 14336, 32, 32, 8, 8, 2)
            .with_max_position_embeddings(32768)
            .with_rope_theta(1e6)
    }

    /// A tiny Mixtral for CPU runs and tests: 2 layers, width 64, 4 experts, top-2, GQA (4 query, 2 kv
    /// heads). The vocabulary (259) fits a byte-level tokenizer with three special tokens.
    pub fn tiny() -> Self {
        Self::new(259, 64, 128, 2, 4, 2, 4, 2).with_max_position_embeddings(512).with_rope_theta(10000.0)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks that the numbers describe a model this crate can build.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the offending values.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid { origin: origin.to_string(), message });
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
        ] {
            if v == 0 {
                return invalid(format!("{name} must be positive"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return invalid(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return invalid(format!(
                "hidden_size {} is not divisible by num_attention_heads {} and head_dim is not set",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let head_dim = self.head_dim();
        if head_dim == 0 || head_dim % 2 != 0 {
            return invalid(format!("head_dim {head_dim} must be positive and even (RoPE rotates pairs)"));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return invalid(format!(
                "num_experts_per_tok {} exceeds num_local_experts {}",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if self.sliding_window == Some(0) {
            return invalid("sliding_window must be positive or null".to_string());
        }
        if !(self.rms_norm_eps > 0.0) || !(self.rope_theta > 0.0) {
            return invalid(format!(
                "rms_norm_eps {} and rope_theta {} must be positive",
                self.rms_norm_eps, self.rope_theta
            ));
        }
        Ok(())
    }

    /// Reads an HF `config.json` (classic form with a top-level `rope_theta`, or the transformers-5
    /// form with `rope_parameters.rope_theta`; `head_dim` and `sliding_window` may be null).
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and field.
    pub fn from_hf_json_file(path: &Path) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: display.clone(), source })?;
        Self::from_hf_json_str(&text, &display)
    }

    /// [`from_hf_json_file`](Self::from_hf_json_file) on a string; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError`] naming the origin and field.
    pub fn from_hf_json_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let hf: HfConfig =
            serde_json::from_str(text).map_err(|source| ConfigError::Json { path: origin.to_string(), source })?;
        let missing = |field| ConfigError::Missing { path: origin.to_string(), field };
        let unsupported = |message: String| ConfigError::Unsupported { origin: origin.to_string(), message };
        if let Some(model_type) = &hf.model_type
            && model_type != "mixtral"
        {
            return Err(unsupported(format!("model_type is '{model_type}', expected 'mixtral'")));
        }
        if let Some(act) = &hf.hidden_act
            && act != "silu"
        {
            return Err(unsupported(format!("hidden_act '{act}' (only silu)")));
        }
        if hf.tie_word_embeddings == Some(true) {
            return Err(unsupported("tie_word_embeddings = true (Mixtral has a separate lm_head)".into()));
        }
        let rope_theta = match (&hf.rope_parameters, hf.rope_theta) {
            (Some(p), _) => {
                if let Some(kind) = &p.rope_type
                    && kind != "default"
                {
                    return Err(unsupported(format!("rope_parameters.rope_type '{kind}' (only default)")));
                }
                p.rope_theta.or(hf.rope_theta).unwrap_or(1e6)
            }
            (None, theta) => theta.unwrap_or(1e6),
        };
        if let Some(scaling) = &hf.rope_scaling
            && !scaling.is_null()
        {
            return Err(unsupported(format!("rope_scaling {scaling} (only default RoPE)")));
        }
        let num_attention_heads = hf.num_attention_heads.ok_or_else(|| missing("num_attention_heads"))?;
        let config = Self {
            vocab_size: hf.vocab_size.ok_or_else(|| missing("vocab_size"))?,
            hidden_size: hf.hidden_size.ok_or_else(|| missing("hidden_size"))?,
            intermediate_size: hf.intermediate_size.ok_or_else(|| missing("intermediate_size"))?,
            num_hidden_layers: hf.num_hidden_layers.ok_or_else(|| missing("num_hidden_layers"))?,
            num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim: hf.head_dim,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(32768),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            rope_theta,
            sliding_window: hf.sliding_window,
            num_local_experts: hf.num_local_experts.ok_or_else(|| missing("num_local_experts"))?,
            num_experts_per_tok: hf.num_experts_per_tok.ok_or_else(|| missing("num_experts_per_tok"))?,
            router_aux_loss_coef: hf.router_aux_loss_coef.unwrap_or(0.001),
            initializer_range: hf.initializer_range.unwrap_or(0.02),
            bos_token_id: hf.bos_token_id,
            eos_token_id: hf.eos_token_id,
            moe_kernel: MoeKernel::Reference,
            attention_kernel: AttentionKernel::Eager,
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// The HF `config.json` (classic form, as Mixtral-8x7B ships it) describing this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "output_router_logits": true,
            "router_jitter_noise": 0.0,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "tie_word_embeddings": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        })
    }
}

/// The subset of HF's `MixtralConfig` JSON that matters here; every field optional so that missing
/// ones get a precise error or HF's default.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<HfRopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    router_aux_loss_coef: Option<f64>,
    initializer_range: Option<f64>,
    hidden_act: Option<String>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct HfRopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASSIC: &str = r#"{"architectures":["MixtralForCausalLM"],"model_type":"mixtral","vocab_size":32000,
        "hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
        "num_key_value_heads":8,"max_position_embeddings":32768,"rms_norm_eps":1e-05,"rope_theta":1000000.0,
        "sliding_window":null,"num_local_experts":8,"num_experts_per_tok":2,"router_aux_loss_coef":0.02,
        "hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2}"#;

    #[test]
    fn classic_config_matches_the_preset() {
        let c = MixtralConfig::from_hf_json_str(CLASSIC, "test").unwrap();
        assert_eq!(c, MixtralConfig::mixtral_8x7b());
        assert_eq!(c.head_dim(), 128);
    }

    #[test]
    fn transformers5_rope_parameters_and_null_head_dim() {
        let text = CLASSIC.replace(
            r#""rope_theta":1000000.0,"#,
            r#""rope_parameters":{"rope_theta":500.0,"rope_type":"default"},"head_dim":null,"#,
        );
        let c = MixtralConfig::from_hf_json_str(&text, "test").unwrap();
        assert_eq!(c.rope_theta, 500.0);
        assert_eq!(c.head_dim, None);
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let e = MixtralConfig::from_hf_json_str("{", "cfg.json").unwrap_err();
        assert!(e.to_string().contains("cfg.json"), "{e}");
        let e = MixtralConfig::from_hf_json_str(&CLASSIC.replace(r#""vocab_size":32000,"#, ""), "cfg.json")
            .unwrap_err();
        assert!(e.to_string().contains("vocab_size"), "{e}");
        let e = MixtralConfig::from_hf_json_str(&CLASSIC.replace(r#""num_key_value_heads":8"#, r#""num_key_value_heads":5"#), "c")
            .unwrap_err();
        assert!(e.to_string().contains("num_attention_heads 32 is not a multiple of num_key_value_heads 5"), "{e}");
        let e = MixtralConfig::from_hf_json_str(&CLASSIC.replace(r#""num_experts_per_tok":2"#, r#""num_experts_per_tok":9"#), "c")
            .unwrap_err();
        assert!(e.to_string().contains("num_experts_per_tok 9 exceeds num_local_experts 8"), "{e}");
        let e = MixtralConfig::from_hf_json_str(&CLASSIC.replace("\"silu\"", "\"gelu\""), "c").unwrap_err();
        assert!(matches!(e, ConfigError::Unsupported { .. }), "{e}");
    }

    #[test]
    fn hf_json_round_trip() {
        let c = MixtralConfig::tiny().with_sliding_window(Some(7)).with_head_dim(Some(32));
        let back = MixtralConfig::from_hf_json_str(&c.to_hf_json().to_string(), "rt").unwrap();
        assert_eq!(back, c);
    }
}
