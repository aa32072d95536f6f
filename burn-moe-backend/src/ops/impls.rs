//! [`MoeBackend`] for the CPU backend: the default (standard-op) implementations.

use burn::backend::NdArray;

use super::backend::MoeBackend;

impl MoeBackend for NdArray<f32> {}
impl MoeBackend for NdArray<f64> {}
