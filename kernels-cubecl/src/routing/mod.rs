//! Device-side routing metadata: the same histogram, offsets, stable expert sort, inverse
//! permutation and padded blocks as [`crate::reference::routing`], computed by CubeCL kernels so that
//! routing needs no host round trip. Results are bit-identical to
//! [`RoutingPlan`](crate::RoutingPlan) for valid indices.
//!
//! # Algorithm
//!
//! Four kernels, none with atomics (every count is a cube-wide scan in shared memory, so the results
//! do not depend on scheduling):
//!
//! 1. [`expert_histogram_kernel`]: `E + 1` cubes; cube `e` counts the indices equal to `e` (cube `E`
//!    counts the out-of-range ones), each unit over a unit-strided share of the `T·k` indices, then
//!    one cube scan reduces the per-unit counts.
//! 2. [`padded_offsets_kernel`]: one cube scans the `E` counts (each rounded up to a multiple of
//!    `block`; `block = 1` gives the plain offsets) in chunks of [`ROUTING_UNITS`] experts,
//!    carrying the running total between chunks.
//! 3. [`stable_scatter_kernel`]: `E` cubes; cube `e` walks the `T·k` indices in chunks of
//!    [`ROUTING_CHUNK`], unit `u` owning [`ROUTING_ITEMS`] consecutive pairs. A cube scan of the
//!    per-unit match counts gives every match its rank among the earlier matches of `e` (units own
//!    pairs in flat order), so pair `f` lands at `offsets[e] + rank`: a stable counting sort that
//!    writes `sorted_flat`, `sorted_token` and the inverse `slots` in the same step.
//! 4. [`block_expert_kernel`]: one unit per padded block, a binary search over the padded offsets.
//!
//! # Cost
//!
//! Kernels 1 and 3 each read all `T·k` indices once *per expert*: `2·E·T·k` index reads, spread over
//! `E` (+1) cubes that run in parallel, plus `⌈T·k / ROUTING_CHUNK⌉ · log2(ROUTING_UNITS)` scan
//! steps (two barriers each) per cube in kernel 3. Each pair is written once (three `u32` stores).
//! This suits the small expert counts of MoE layers (`E ≤ 64`: 64 cubes fill a fair part of a GPU,
//! and re-reading the indices stays in L2); for thousands of experts a one-pass radix-style sort
//! (per-chunk histograms, a global scan, one scatter) would read the indices a constant number of
//! times instead. Kernel 2 is `⌈E / ROUTING_UNITS⌉` scan steps in one cube; kernel 4 is
//! `O(log E)` per block. Limits: `T·k` and the padded rows must fit in `u32`, and `E + 1` cubes
//! must fit the device's cube count along x (65 535 on most devices).

mod kernel;
mod launch;

pub use kernel::{
    ROUTING_CHUNK, ROUTING_ITEMS, ROUTING_UNITS, block_expert_kernel, expert_histogram_kernel, padded_offsets_kernel,
    stable_scatter_kernel,
};
pub use launch::{
    PaddedBlocks, RoutingBuffers, RoutingProblem, launch_block_expert, launch_padded_blocks, launch_padded_offsets,
    launch_routing,
};
