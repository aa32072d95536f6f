//! # examples
//!
//! Runnable programs for burn-moe users (`cargo run --release -p examples --example NAME`):
//!
//! - `mixtral_forward`: the HF parity tool. Runs any HF Mixtral directory (classic or fused layout,
//!   single or sharded safetensors, f32/bf16/f16) on given token ids and writes logits, losses and,
//!   with `--grads`, d(loss)/d(tensor) for every checkpoint tensor under its on-disk name, so the
//!   result can be compared with transformers.
//!
//! This package may depend on every crate of the workspace; it holds no library code of its own.
