//! The Mixtral network: layers, decoder blocks, the causal-LM head and its loss.

mod attention;
mod causal_lm;
mod decoder;
mod linear;
mod lora;
mod loss;
mod rms_norm;
mod rope;

pub use attention::{AttentionKernel, MixtralAttention};
pub use causal_lm::{CausalLmOutput, InitRng, MixtralForCausalLM, MixtralModel, ModelOutput};
pub use decoder::DecoderLayer;
pub use linear::{HfLinear, LinearLora};
pub use lora::LoraTargets;
pub use loss::{IGNORE_INDEX, causal_lm_loss};
pub use rms_norm::RmsNorm;
pub use rope::RotaryEmbedding;
