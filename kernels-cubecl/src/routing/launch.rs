//! Launchers of the routing kernels: validate the data-free [`RoutingProblem`], size the grids,
//! launch. No launcher reads device data back, so routing never synchronises the host.
//!
//! Buffers are raw CubeCL handles. Expert indices are `[T·k]` of the integer type `I` (u32, i32 or
//! i64, as the backend stores them); every output is `u32`. Because the launchers cannot see the
//! indices, they cannot reject out-of-range ones: the kernels skip them (no position, no slot is
//! written for such a pair) and count them in [`RoutingBuffers::invalid`], which a caller that does
//! not already trust its router checks.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::kernel::{
    ROUTING_UNITS, block_expert_kernel, expert_histogram_kernel, padded_offsets_kernel, stable_scatter_kernel,
};
use crate::scatter::KernelError;

/// A routing of `tokens` tokens to `top_k` of `num_experts` experts each, without data.
///
/// # Shapes
/// - indices (input): `[tokens · top_k]`, row-major `(token, slot)`.
/// - `counts`: `[num_experts]`; `offsets`: `[num_experts + 1]`.
/// - `sorted_flat`, `sorted_token`, `slots`: `[tokens · top_k]`.
/// - `padded_offsets`: `[num_experts + 1]`; `block_expert`: `[capacity]`, at least the number of
///   padded blocks ([`max_blocks`](Self::max_blocks) always suffices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingProblem {
    /// Number of tokens `T`.
    pub tokens: usize,
    /// Experts per token `k`.
    pub top_k: usize,
    /// Number of experts `E`.
    pub num_experts: usize,
}

impl RoutingProblem {
    /// Checks that `top_k` and `num_experts` are positive and that `T·k` and `E + 1` fit the `u32`
    /// positions the kernels write.
    ///
    /// # Errors
    /// [`KernelError::Shape`] naming the offending numbers.
    pub fn validate(&self) -> Result<(), KernelError> {
        let Self { tokens, top_k, num_experts } = *self;
        if top_k == 0 {
            return Err(KernelError::Shape(format!(
                "routing problem with top_k = 0 (tokens = {tokens}, num_experts = {num_experts}): every token needs at least one expert"
            )));
        }
        if num_experts == 0 {
            return Err(KernelError::Shape(format!(
                "routing problem with num_experts = 0 (tokens = {tokens}, top_k = {top_k}): there is no expert to route to"
            )));
        }
        match tokens.checked_mul(top_k) {
            Some(pairs) if u32::try_from(pairs).is_ok() => {}
            _ => {
                return Err(KernelError::Shape(format!(
                    "routing problem with tokens = {tokens} x top_k = {top_k} pairs does not fit the u32 positions of the routing kernels"
                )));
            }
        }
        if u32::try_from(num_experts).is_err() {
            return Err(KernelError::Shape(format!("routing problem with num_experts = {num_experts} does not fit in u32")));
        }
        Ok(())
    }

    /// `T·k`, the number of (token, slot) pairs.
    pub fn pairs(&self) -> usize {
        self.tokens * self.top_k
    }

    /// An upper bound on the number of padded blocks of size `block` whatever the routing: every
    /// block holds at least one pair, and the padded rows total at most `T·k + E·(block − 1)`.
    pub fn max_blocks(&self, block: usize) -> usize {
        let block = block.max(1);
        let padded_max = self.pairs().saturating_add(self.num_experts.saturating_mul(block - 1));
        self.pairs().min(padded_max / block)
    }

    /// Validates the problem and `block`: positive, and the padded rows (at most
    /// `T·k + E·(block − 1)`) fit in `u32`.
    fn validate_block(&self, block: usize) -> Result<u32, KernelError> {
        self.validate()?;
        if block == 0 {
            return Err(KernelError::Shape(format!(
                "routing block size is 0 (tokens = {}, top_k = {}, num_experts = {})",
                self.tokens, self.top_k, self.num_experts
            )));
        }
        let padded_max = self.num_experts.checked_mul(block - 1).and_then(|p| p.checked_add(self.pairs()));
        match (u32::try_from(block), padded_max.map(u32::try_from)) {
            (Ok(b), Some(Ok(_))) => Ok(b),
            _ => Err(KernelError::Shape(format!(
                "routing with block = {block}: up to {} pairs + {} experts x {} padding rows do not fit in u32",
                self.pairs(),
                self.num_experts,
                block - 1
            ))),
        }
    }
}

/// The device outputs of [`launch_routing`], all `u32`.
#[derive(Debug, Clone)]
pub struct RoutingBuffers {
    /// `[E]`: pairs routed to each expert.
    pub counts: Handle,
    /// `[E + 1]`: exclusive prefix sum of `counts` (segment `e` is `offsets[e]..offsets[e + 1]`).
    pub offsets: Handle,
    /// `[T·k]`: the flat index `token·k + slot` of the i-th pair in (stable) expert order.
    pub sorted_flat: Handle,
    /// `[T·k]`: `sorted_flat / k`, the token row each sorted pair reads.
    pub sorted_token: Handle,
    /// `[T·k]`: the inverse of `sorted_flat`, where pair `token·k + slot` lands in expert order.
    pub slots: Handle,
    /// `[1]`: how many indices were outside `[0, E)` and skipped. When it is not 0, `offsets[E]` is
    /// short of `T·k` by that much, the tail of `sorted_flat`/`sorted_token` and the skipped pairs'
    /// `slots` are left unwritten.
    pub invalid: Handle,
}

impl RoutingBuffers {
    /// Allocates the outputs of `problem` (each at least one element, so that empty routings still
    /// bind valid buffers).
    pub fn empty<R: Runtime>(client: &ComputeClient<R>, problem: &RoutingProblem) -> Self {
        let alloc = |n: usize| client.empty(n.max(1) * size_of::<u32>());
        let pairs = problem.pairs();
        Self {
            counts: alloc(problem.num_experts),
            offsets: alloc(problem.num_experts + 1),
            sorted_flat: alloc(pairs),
            sorted_token: alloc(pairs),
            slots: alloc(pairs),
            invalid: alloc(1),
        }
    }
}

/// `n` cubes of [`ROUTING_UNITS`] along x, checked against the device's limit.
fn cubes<R: Runtime>(client: &ComputeClient<R>, n: usize, what: &str) -> Result<CubeCount, KernelError> {
    let max_x = client.properties().hardware.max_cube_count.0;
    match u32::try_from(n) {
        Ok(x) if x <= max_x => Ok(CubeCount::Static(x, 1, 1)),
        _ => Err(KernelError::Shape(format!("routing {what} needs {n} cubes, more than the device's {max_x}"))),
    }
}

fn units() -> CubeDim {
    CubeDim::new_1d(ROUTING_UNITS)
}

/// Computes the whole routing plan of `indices` (`[T·k]` of `I` on the device) into `out`: the
/// expert histogram, its offsets and the stable expert sort with its inverse. Bit-identical to
/// [`RoutingPlan::from_expert_indices`](crate::RoutingPlan::from_expert_indices) and
/// [`RoutingPlan::slots`](crate::RoutingPlan::slots) for valid indices; out-of-range indices are
/// skipped and counted in `out.invalid` (see [`RoutingBuffers`]). `indices` must hold at least one
/// element even when `T·k = 0` (any buffer binds).
///
/// # Errors
/// [`KernelError::Shape`] when the problem is invalid ([`RoutingProblem::validate`]) or needs more
/// than the device's cube count along x (`E + 1` cubes).
pub fn launch_routing<R: Runtime, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    problem: &RoutingProblem,
    indices: Handle,
    out: &RoutingBuffers,
) -> Result<(), KernelError> {
    problem.validate()?;
    let pairs = problem.pairs();
    let e = problem.num_experts;
    let arg = |h: &Handle, n: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), n.max(1)) };
    let histogram_cubes = cubes(client, e + 1, "histogram")?;
    let scatter_cubes = cubes(client, e, "scatter")?;
    // SAFETY (all three launches): every index the kernels form is bounded in the kernel, by `len`
    // for the indices and the per-pair outputs, by `num_experts` for counts and offsets; scatter
    // positions are `offsets[e] + rank < offsets[e + 1] ≤ T·k` because ranks count only the pairs
    // that the histogram counted for `e`. The buffers hold the lengths given here.
    unsafe {
        expert_histogram_kernel::launch_unchecked::<I, R>(
            client,
            histogram_cubes,
            units(),
            arg(&indices, pairs),
            arg(&out.counts, e),
            arg(&out.invalid, 1),
            pairs,
            e,
        );
        padded_offsets_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(1, 1, 1),
            units(),
            arg(&out.counts, e),
            arg(&out.offsets, e + 1),
            e,
            1u32,
        );
        if pairs > 0 {
            stable_scatter_kernel::launch_unchecked::<I, R>(
                client,
                scatter_cubes,
                units(),
                arg(&indices, pairs),
                arg(&out.offsets, e + 1),
                arg(&out.sorted_flat, pairs),
                arg(&out.sorted_token, pairs),
                arg(&out.slots, pairs),
                pairs,
                problem.top_k,
            );
        }
    }
    Ok(())
}

/// `padded_offsets [E + 1]` from `counts [E]` (device, `u32`, e.g. [`RoutingBuffers::counts`]): the
/// exclusive prefix sum of the counts rounded up to multiples of `block`, as
/// [`RoutingPlan::padded_blocks`](crate::RoutingPlan::padded_blocks) computes it.
///
/// # Errors
/// [`KernelError::Shape`] for an invalid problem, `block = 0`, or padded sizes beyond `u32`.
pub fn launch_padded_offsets<R: Runtime>(
    client: &ComputeClient<R>,
    problem: &RoutingProblem,
    block: usize,
    counts: Handle,
    padded_offsets: Handle,
) -> Result<(), KernelError> {
    let block = problem.validate_block(block)?;
    let e = problem.num_experts;
    // SAFETY: the kernel reads `counts[e]` and writes `offsets[e + 1]` only for `e < num_experts`.
    unsafe {
        padded_offsets_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(1, 1, 1),
            units(),
            ArrayArg::from_raw_parts(counts, e),
            ArrayArg::from_raw_parts(padded_offsets, e + 1),
            e,
            block,
        );
    }
    Ok(())
}

/// `block_expert [capacity]` from `padded_offsets [E + 1]` (device, `u32`, from
/// [`launch_padded_offsets`] with the same `block`): entry `b` is the expert of padded block `b` for
/// the `padded_offsets[E] / block` blocks that exist, and `E` (no expert) for the rest. The number of
/// blocks is device data, so the caller sizes the buffer without it: `capacity =`
/// [`RoutingProblem::max_blocks`] always suffices; a caller that needs the exact count reads
/// `padded_offsets[E]` back itself.
///
/// # Errors
/// [`KernelError::Shape`] for an invalid problem or `block`.
pub fn launch_block_expert<R: Runtime>(
    client: &ComputeClient<R>,
    problem: &RoutingProblem,
    block: usize,
    padded_offsets: Handle,
    capacity: usize,
    block_expert: Handle,
) -> Result<(), KernelError> {
    let block = problem.validate_block(block)?;
    if capacity == 0 {
        return Ok(());
    }
    let e = problem.num_experts;
    let count = cubecl::calculate_cube_count_elemwise(client, capacity, units());
    // SAFETY: the kernel stops units at `b ≥ capacity` and searches `padded_offsets` within `0..=E`.
    unsafe {
        block_expert_kernel::launch_unchecked::<R>(
            client,
            count,
            units(),
            ArrayArg::from_raw_parts(padded_offsets, e + 1),
            ArrayArg::from_raw_parts(block_expert, capacity),
            e,
            block,
            capacity,
        );
    }
    Ok(())
}

/// The block-sparse layout of a routing on the device: [`launch_padded_offsets`] then
/// [`launch_block_expert`].
#[derive(Debug, Clone)]
pub struct PaddedBlocks {
    /// `[E + 1]`: padded segment boundaries, each segment a multiple of the block size.
    pub padded_offsets: Handle,
    /// `[capacity]`: the expert of each padded block, then `E` past the last block.
    pub block_expert: Handle,
    /// Entries of `block_expert` ([`RoutingProblem::max_blocks`]); the blocks that exist are
    /// `padded_offsets[E] / block` of them.
    pub capacity: usize,
}

/// Allocates and computes the [`PaddedBlocks`] of `counts [E]` (device, `u32`) for blocks of `block`
/// rows, with `block_expert` sized [`RoutingProblem::max_blocks`] so that nothing is read back.
///
/// # Errors
/// [`KernelError::Shape`] for an invalid problem or `block`.
pub fn launch_padded_blocks<R: Runtime>(
    client: &ComputeClient<R>,
    problem: &RoutingProblem,
    block: usize,
    counts: Handle,
) -> Result<PaddedBlocks, KernelError> {
    problem.validate_block(block)?;
    let capacity = problem.max_blocks(block);
    let padded_offsets = client.empty((problem.num_experts + 1) * size_of::<u32>());
    let block_expert = client.empty(capacity.max(1) * size_of::<u32>());
    launch_padded_offsets(client, problem, block, counts, padded_offsets.clone())?;
    launch_block_expert(client, problem, block, padded_offsets.clone(), capacity, block_expert.clone())?;
    Ok(PaddedBlocks { padded_offsets, block_expert, capacity })
}
