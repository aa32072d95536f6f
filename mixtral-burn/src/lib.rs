//! # mixtral-burn
//!
//! Mixtral (sparse mixture-of-experts decoder) on Burn, generic over any backend, with import and export
//! of Hugging Face checkpoints (classic per-expert layout and the transformers-5 fused layout).
//!
//! Model code is single-device: it contains no collective call. The experts run through
//! [`burn_moe_backend::DMoe`], whose kernel is chosen by [`MixtralConfig::moe_kernel`]; parallelism
//! (expert parallelism, FSDP) is applied from outside through the token dispatcher and the sharding
//! plan, never inside the layers.
//!
//! Depends on `burn`, `burn-moe-backend`, `safetensors`; nothing here knows about training loops.

pub mod checkpoint;
pub mod config;
pub mod model;
pub mod parity;

pub use checkpoint::{CheckpointError, HfCheckpoint, HfLayout, LazyWeights, load_peft_adapter, save_hf_classic, save_peft_adapter};
pub use config::{ConfigError, MixtralConfig};
pub use burn_moe_backend::LoraConfig;
pub use model::{AttentionKernel, InitRng, LoraTargets, CausalLmOutput, MixtralForCausalLM, MixtralModel, causal_lm_loss};
