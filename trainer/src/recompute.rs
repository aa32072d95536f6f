//! `--gradient-checkpointing`: activation recomputation through Burn's autodiff checkpointing.
//!
//! Burn's autodiff records, for every operation, whether it is compute-bound (matmuls, the MoE
//! kernels, the token all-to-alls: their outputs are kept for the backward pass) or memory-bound
//! (elementwise ops, the pieces of softmax and RMSNorm, casts, reshapes). With
//! [`BalancedCheckpointing`] the memory-bound results are not kept: the backward pass recomputes
//! them from the nearest kept result when it needs them. That is activation recomputation at the
//! granularity Burn offers — per operation, in every decoder layer — rather than PyTorch's
//! per-layer `checkpoint(layer)`, which also recomputes the matmuls: less memory is saved than
//! there, and much less compute is repeated.
//!
//! The strategy is part of the backend type (`Autodiff<B, C>`), so the binary picks the type from
//! the flag and [`train`](crate::train::train) refuses a flag that contradicts its type.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::tensor::backend::Backend;

/// Whether an autodiff backend type recomputes activations.
pub trait Recompute {
    /// `true` for [`BalancedCheckpointing`].
    const RECOMPUTES: bool;
}

impl<B: Backend> Recompute for Autodiff<B, NoCheckpointing> {
    const RECOMPUTES: bool = false;
}

impl<B: Backend> Recompute for Autodiff<B, BalancedCheckpointing> {
    const RECOMPUTES: bool = true;
}
