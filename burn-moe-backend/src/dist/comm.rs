//! The collective-communication interface every parallel layer of burn-moe talks to.
//!
//! Semantics follow `torch.distributed` so that code (and people) can move between the two:
//! every member of a group calls the same collectives in the same order; ranks are positions inside
//! the group (`0..size()`); tensors are contiguous and the split/concat dimension is explicit.
//! Implementations: the in-process one (one thread per rank, any backend, used by CI and CPU
//! training) and NCCL (CUDA tensors, one process per GPU). Both must give identical results for the
//! same inputs, which is what the CPU tests pin down.

use std::time::Duration;

use burn::tensor::{Tensor, backend::Backend};

/// Reduction applied by [`Communicator::all_reduce`] and [`Communicator::reduce_scatter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Element-wise sum over ranks.
    Sum,
    /// Element-wise sum divided by the group size.
    Avg,
}

/// Errors of a collective. Every variant names the collective and the group so that a failure in a
/// 4 × 2 mesh says which of the six groups broke.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// Some ranks did not reach the collective in time (dead, hung, or calling collectives in a
    /// different order).
    #[error("{collective} on group `{group}` timed out after {timeout:?}: {}", describe_missing(.missing))]
    Timeout {
        collective: &'static str,
        group: String,
        missing: Vec<usize>,
        timeout: Duration,
    },
    /// A peer reported a failure (its process exited, its thread panicked, the NCCL
    /// communicator was aborted).
    #[error("{collective} on group `{group}`: rank {rank} failed: {reason}")]
    PeerFailed {
        collective: &'static str,
        group: String,
        rank: usize,
        reason: String,
    },
    /// Ranks disagree on something that must match (shapes, dtypes, split sizes, root).
    #[error("{collective} on group `{group}`: ranks disagree: {detail}")]
    Mismatch {
        collective: &'static str,
        group: String,
        detail: String,
    },
    /// The call itself is invalid on this rank (bad dim, split sizes not summing to the length, ...).
    #[error("{collective} on group `{group}`: invalid argument: {detail}")]
    InvalidArgument {
        collective: &'static str,
        group: String,
        detail: String,
    },
    /// Process-group set-up failed (environment variables, rendezvous, NCCL initialisation).
    #[error("process group setup: {0}")]
    Setup(String),
    /// The transport itself failed (NCCL error code, CUDA error).
    #[error("{collective} on group `{group}`: {detail}")]
    Transport {
        collective: &'static str,
        group: String,
        detail: String,
    },
}

/// Collectives over Burn tensors for one process group.
///
/// A communicator is bound to one rank of one group; a sub-group is obtained with
/// [`split`](Communicator::split), which every member of the parent group must call.
/// All methods are blocking for the caller: when they return, the result tensor holds the data
/// (implementations synchronise the backend as needed — the NCCL one documents how).
///
/// Inputs are taken by value; on error the input is dropped. Dimension arguments are plain
/// `usize` indices into the tensor's shape.
pub trait Communicator<B: Backend>: Send + Sized {
    /// This member's rank inside the group, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of members of the group.
    fn size(&self) -> usize;
    /// Human-readable group name used in errors and logs (e.g. `world`, `ep[2,3]`).
    fn group_name(&self) -> &str;
    /// The world (global) rank of each member, in group-rank order.
    fn global_ranks(&self) -> &[usize];

    /// Element-wise reduction of `tensor` over the group; every rank receives the result.
    /// All ranks must pass the same shape and dtype.
    fn all_reduce<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        op: ReduceOp,
    ) -> Result<Tensor<B, D>, CommError>;

    /// Concatenation of every rank's `tensor` along `dim`, in rank order. All ranks must pass the
    /// same shape (uneven shards are padded by the caller, as the sharded-tensor type does).
    fn all_gather<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        dim: usize,
    ) -> Result<Tensor<B, D>, CommError>;

    /// Reduces `tensor` over the group, then returns this rank's `size()`-th part along `dim`
    /// (rank `r` gets rows `r*n/size .. (r+1)*n/size`). `shape[dim]` must be divisible by `size()`.
    fn reduce_scatter<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Tensor<B, D>, CommError>;

    /// All-to-all with per-rank split sizes along dim 0 (`all_to_all_single` with
    /// `input_split_sizes` / `output_split_sizes`): rows `input_splits[..j].sum() ..` of this rank's
    /// input go to rank `j`; the output holds, in rank order, `output_splits[j]` rows from rank `j`.
    /// `input_splits` must sum to `shape[0]`; every rank's `output_splits[j]` must equal rank `j`'s
    /// `input_splits[rank]` (checked by the in-process implementation; the caller exchanges counts
    /// first, as token dispatch does). Zero-length splits are allowed; trailing dims must match.
    fn all_to_all_single<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        input_splits: &[usize],
        output_splits: &[usize],
    ) -> Result<Tensor<B, D>, CommError>;

    /// Every rank receives rank `root`'s `tensor` (others pass a tensor of the same shape and dtype
    /// whose content is ignored).
    fn broadcast<const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        root: usize,
    ) -> Result<Tensor<B, D>, CommError>;

    /// Returns once every member has called it.
    fn barrier(&self) -> Result<(), CommError>;

    /// While `on`, an [`all_gather`](Self::all_gather) along dim 0 may return before its output is
    /// complete: it is queued on the transport (its input is final, as for every collective) and
    /// this rank goes on, so the transfer overlaps whatever the caller queues next — FSDP's
    /// prefetch of the next unit's parameters. The output must not be read (by any kernel) until
    /// [`wait_gathers`](Self::wait_gathers) has returned, and the caller may not turn it into
    /// another tensor by an operation that runs a kernel before then (views are fine). Other
    /// collectives stay blocking and also complete every gather queued before them.
    /// Implementations whose collectives are always complete on return (the in-process one)
    /// ignore it; the default does.
    fn defer_gathers(&self, on: bool) {
        let _ = on;
    }

    /// Waits for every all-gather queued under [`defer_gathers`](Self::defer_gathers); afterwards
    /// their outputs may be read. A peer that never joins surfaces here as
    /// [`CommError::Timeout`]. The default has nothing to wait for.
    fn wait_gathers(&self) -> Result<(), CommError> {
        Ok(())
    }

    /// While `on`, a [`reduce_scatter`](Self::reduce_scatter) along dim 0 may return before its
    /// output is complete, like an all-gather under [`defer_gathers`](Self::defer_gathers): it is
    /// queued on the transport and this rank goes on, so the reduction of one unit's gradients
    /// overlaps the next unit's backward pass (FSDP's asynchronous reduce-scatter). The output must
    /// not be read, nor turned into another tensor by a kernel, until
    /// [`wait_reductions`](Self::wait_reductions) has returned (views are fine). Other collectives
    /// stay blocking and complete every reduction queued before them; waiting for gathers does not
    /// wait for reductions queued after them. Ignored where collectives always complete on return
    /// (the in-process implementation and the default).
    fn defer_reductions(&self, on: bool) {
        let _ = on;
    }

    /// Waits for every reduce-scatter queued under [`defer_reductions`](Self::defer_reductions);
    /// afterwards their outputs may be read. A peer that never joins surfaces here as
    /// [`CommError::Timeout`]. The default has nothing to wait for.
    fn wait_reductions(&self) -> Result<(), CommError> {
        Ok(())
    }

    /// Splits the group like `MPI_Comm_split` / `ncclCommSplit`: members passing the same `color`
    /// form a new group, ordered by `(key, parent rank)`. Every member of this group must call it.
    /// `name` names the new group in errors and logs.
    fn split(&self, color: usize, key: usize, name: &str) -> Result<Self, CommError>;
}

fn describe_missing(missing: &[usize]) -> String {
    if missing.is_empty() {
        "a peer never completed it (the transport cannot tell which; see the launcher's log for a rank that exited)".to_string()
    } else {
        format!("rank(s) {missing:?} never arrived")
    }
}

/// Validates the split sizes of an all-to-all on one rank against the input length and group size.
pub fn check_splits(
    group: &str,
    size: usize,
    len: usize,
    input_splits: &[usize],
    output_splits: &[usize],
) -> Result<(), CommError> {
    let invalid = |detail: String| CommError::InvalidArgument {
        collective: "all_to_all_single",
        group: group.to_string(),
        detail,
    };
    if input_splits.len() != size || output_splits.len() != size {
        return Err(invalid(format!(
            "{} input and {} output split sizes for a group of {size}",
            input_splits.len(),
            output_splits.len()
        )));
    }
    let sum: usize = input_splits.iter().sum();
    if sum != len {
        return Err(invalid(format!(
            "input split sizes {input_splits:?} sum to {sum}, but the input has {len} rows"
        )));
    }
    Ok(())
}
