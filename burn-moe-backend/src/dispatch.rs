//! Token dispatchers: who computes a [`DMoe`]'s experts for the routed tokens.
//!
//! The layer routes its tokens and hands the expert computation to a [`TokenDispatcher`]. Model code
//! never talks to other devices: expert parallelism is applied from outside by passing an
//! [`AllToAllDispatcher`] instead of the default [`LocalDispatcher`] (the torchtitan design: EP is a
//! swap of the token dispatcher).

use core::ops::Range;

use burn::tensor::{Int, Tensor};

use crate::dist::{CollectiveBackend, GraphComm, all_to_all_rows};
use crate::dmoe::DMoe;
use crate::ops::{HostIndex, MoeBackend, moe_combine_host, moe_permute_host};
use crate::reference::host_routing_plan;

/// Computes `out[t] = Σ_j weights[t, j] · expert_{experts[t, j]}(x[t])` for a layer's routed tokens.
pub trait TokenDispatcher<B: MoeBackend> {
    /// The weighted expert outputs of every token.
    ///
    /// # Shapes
    /// - `x`: `[T, D]`, `weights`: `[T, k]`, `experts`: `[T, k]` (global expert ids) → `[T, D]`
    fn dispatch(&self, moe: &DMoe<B>, x: Tensor<B, 2>, weights: Tensor<B, 2>, experts: Tensor<B, 2, Int>) -> Tensor<B, 2>;
}

/// All experts live in the layer on this device: [`DMoe::experts`] with the layer's kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalDispatcher;

impl<B: MoeBackend> TokenDispatcher<B> for LocalDispatcher {
    fn dispatch(&self, moe: &DMoe<B>, x: Tensor<B, 2>, weights: Tensor<B, 2>, experts: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        moe.experts(x, weights, experts)
    }
}

/// Expert parallelism over one EP group of `P` ranks: rank `r` holds experts
/// [`experts_of_rank`]`(E, P, r)` (its layer was cut with [`DMoe::local_experts`]); tokens travel to
/// their experts' ranks and back by all-to-all.
///
/// Per layer: route → group the (token, slot) pairs by expert (hence by destination rank) → exchange
/// per-expert counts → all-to-all-v the rows → regroup the received rows by local expert → the layer's
/// grouped expert kernels → undo the regrouping → all-to-all-v back → weighted combine. Dropless:
/// every pair is computed, however uneven the counts (a rank may receive nothing). The backward pass
/// mirrors it through the all-to-all's adjoint.
#[derive(Debug, Clone)]
pub struct AllToAllDispatcher<B: CollectiveBackend> {
    comm: GraphComm<B::Wire>,
}

/// The experts rank `rank` of an EP group of `ep_size` holds: a contiguous block of `E / ep_size`.
///
/// # Panics
/// When `ep_size` does not divide `num_experts` or `rank >= ep_size` (validated by
/// [`DeviceMesh`](crate::dist::DeviceMesh) before any layer is cut).
pub fn experts_of_rank(num_experts: usize, ep_size: usize, rank: usize) -> Range<usize> {
    assert!(
        ep_size > 0 && num_experts % ep_size == 0 && rank < ep_size,
        "num_experts {num_experts} not divisible by ep_size {ep_size} (rank {rank})"
    );
    let per = num_experts / ep_size;
    rank * per..(rank + 1) * per
}

impl<B: CollectiveBackend> AllToAllDispatcher<B> {
    /// A dispatcher over the EP group `comm`.
    pub fn new(comm: GraphComm<B::Wire>) -> Self {
        Self { comm }
    }

    /// The EP group.
    pub fn comm(&self) -> &GraphComm<B::Wire> {
        &self.comm
    }
}

impl<B: MoeBackend + CollectiveBackend> TokenDispatcher<B> for AllToAllDispatcher<B> {
    fn dispatch(&self, moe: &DMoe<B>, x: Tensor<B, 2>, weights: Tensor<B, 2>, experts: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let num_experts = moe.num_experts();
        let ranks = self.comm.size();
        let local = experts_of_rank(num_experts, ranks, self.comm.rank()).len();
        let held = moe.w1.dims()[0];
        assert_eq!(held, local, "layer holds {held} experts, but its EP rank owns {local} of {num_experts}");
        let device = x.device();
        let plan = host_routing_plan(experts, num_experts);
        let block_sums = |c: &[usize]| c.chunks(local).map(|b| b.iter().sum()).collect::<Vec<usize>>();
        let send = block_sums(&plan.counts);
        // recv_counts[p·local + e]: rows source p sends to my local expert e.
        let recv_counts = self.comm.exchange_counts(&plan.counts, &B::wire_device(&device));
        let recv = block_sums(&recv_counts);

        let pairs = plan.sorted_token.len();
        let host = |v: Vec<i64>| HostIndex::from(v);
        let xs = if pairs == 0 { x } else { moe_permute_host(x, &host(plan.sorted_token.iter().map(|&t| t as i64).collect())) };
        let xr = all_to_all_rows(xs, &send, &recv, &self.comm);

        // Received rows come source-major; the expert kernels want them expert-major.
        let mut block_start = vec![0usize; ranks];
        for p in 1..ranks {
            block_start[p] = block_start[p - 1] + recv[p - 1];
        }
        let mut perm = Vec::with_capacity(recv.iter().sum());
        let mut counts = vec![0usize; local];
        for (e, count) in counts.iter_mut().enumerate() {
            for p in 0..ranks {
                let start = block_start[p] + recv_counts[p * local..p * local + e].iter().sum::<usize>();
                let n = recv_counts[p * local + e];
                perm.extend((start..start + n).map(|i| i as i64));
                *count += n;
            }
        }
        let received = perm.len();
        let yr = if received == 0 {
            moe.experts_grouped(xr, &counts)
        } else {
            let mut inverse = vec![0i64; received];
            for (i, &src) in perm.iter().enumerate() {
                inverse[src as usize] = i as i64;
            }
            let yg = moe.experts_grouped(moe_permute_host(xr, &host(perm)), &counts);
            moe_permute_host(yg, &host(inverse))
        };
        let ys = all_to_all_rows(yr, &recv, &send, &self.comm);
        moe_combine_host(ys, &host(plan.slots().into_iter().map(|s| s as i64).collect()), weights)
    }
}
