//! Hugging Face checkpoints: reading (memory-mapped safetensors, single or sharded, classic or fused
//! expert layout, f32/bf16/f16) and writing back in the classic layout.

mod adapter;
mod error;
mod export;
mod import;
mod lazy;
mod reader;

pub use adapter::load_peft_adapter;
pub use error::CheckpointError;
pub use export::{FetchTensor, FetchValue, SaveDtype, hf_tensors, save_hf, save_hf_classic, save_hf_with, save_peft_adapter};
pub use import::{HfCheckpoint, HfLayout};
pub use lazy::{LazyWeights, materialize};
pub use reader::SafetensorsFiles;
