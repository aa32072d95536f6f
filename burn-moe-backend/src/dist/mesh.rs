//! The `dp × ep` device mesh of MoE training and the process groups derived from it.
//!
//! # Layout
//!
//! Ranks are laid out row-major over `(dp, ep)` with `ep` the inner (fastest) dimension, like
//! `torch.distributed.device_mesh.init_device_mesh("cuda", (dp, ep), mesh_dim_names=("dp", "ep"))`:
//! `global rank = dp_index * ep_size + ep_index`. Consecutive ranks (usually the GPUs of one node)
//! therefore form an EP group, which keeps the heavy all-to-all traffic on the fast links.
//!
//! ```text
//! dp=2, ep=2:        ep 0   ep 1
//!             dp 0 [  0  ,   1  ]   <- ep group `ep[0,1]`
//!             dp 1 [  2  ,   3  ]   <- ep group `ep[2,3]`
//!                     ^      ^
//!              dp group `dp[0,2]`, `dp[1,3]`
//! ```
//!
//! A 1-D mesh is the `dp × 1` (pure data parallel) or `1 × ep` (pure expert parallel) case; the
//! size-1 dimension's groups are single-rank groups whose collectives are copies.
//!
//! # Sharding groups
//!
//! * [`fsdp_group`](DeviceMesh::fsdp_group): non-expert parameters (attention, norms,
//!   embeddings, router) are replicated in the model's math on every rank, so FSDP shards them
//!   over the **whole mesh** (all `dp × ep` ranks). With `dp_size == 1` this is exactly the EP group
//!   — sharding still happens, there is no "nothing to shard over" fallback.
//! * [`expert_dp_group`](DeviceMesh::expert_dp_group): expert parameters are already split by EP
//!   (rank `ep_index` owns experts [`local_experts`](DeviceMesh::local_experts)); their replicas live
//!   on the ranks with the same EP index, i.e. the **dp group**, which is where they are sharded and
//!   where their gradients are reduced.

use std::ops::Range;

use burn::tensor::backend::Backend;

use super::comm::{CommError, Communicator};

/// Invalid mesh parameters. Messages carry the numbers involved.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A mesh dimension of size zero.
    #[error("mesh dimension `{dim}` has size 0 (world_size {world_size})")]
    ZeroSize {
        dim: &'static str,
        world_size: usize,
    },
    /// One degree does not divide the world.
    #[error("{dim}_size {size} does not divide world_size {world_size}")]
    NotDivisor {
        dim: &'static str,
        size: usize,
        world_size: usize,
    },
    /// The degrees' product is not the world size.
    #[error("dp_size {dp_size} × ep_size {ep_size} != world_size {world_size}")]
    ProductMismatch {
        dp_size: usize,
        ep_size: usize,
        world_size: usize,
    },
    /// Experts cannot be split evenly over the EP group.
    #[error("num_experts {num_experts} not divisible by ep_size {ep_size}")]
    Experts { num_experts: usize, ep_size: usize },
    /// Creating the sub-groups failed.
    #[error("creating the mesh groups: {0}")]
    Comm(#[from] CommError),
}

/// Checks `dp_size × ep_size == world_size` (and that neither is zero).
pub fn validate_mesh(world_size: usize, dp_size: usize, ep_size: usize) -> Result<(), MeshError> {
    if dp_size == 0 {
        return Err(MeshError::ZeroSize {
            dim: "dp",
            world_size,
        });
    }
    if ep_size == 0 {
        return Err(MeshError::ZeroSize {
            dim: "ep",
            world_size,
        });
    }
    if !world_size.is_multiple_of(ep_size) {
        return Err(MeshError::NotDivisor {
            dim: "ep",
            size: ep_size,
            world_size,
        });
    }
    if !world_size.is_multiple_of(dp_size) {
        return Err(MeshError::NotDivisor {
            dim: "dp",
            size: dp_size,
            world_size,
        });
    }
    if dp_size * ep_size != world_size {
        return Err(MeshError::ProductMismatch {
            dp_size,
            ep_size,
            world_size,
        });
    }
    Ok(())
}

/// The 2-D `dp × ep` mesh of one rank: its coordinates and its communicators.
///
/// Mesh dimension 0 is `dp`, dimension 1 is `ep` (see [`DIM_NAMES`](Self::DIM_NAMES)).
#[derive(Debug)]
pub struct DeviceMesh<C> {
    world: C,
    dp: C,
    ep: C,
    dp_size: usize,
    ep_size: usize,
    dp_index: usize,
    ep_index: usize,
}

impl<C> DeviceMesh<C> {
    /// Names of the mesh dimensions, outer first.
    pub const DIM_NAMES: [&'static str; 2] = ["dp", "ep"];

    /// Builds the mesh from the world communicator. Every world rank must call it with the same
    /// degrees (it performs two `split`s on `world`, dp first, then ep).
    ///
    /// # Errors
    /// [`MeshError`] when the degrees do not factor the world size, or a split fails.
    pub fn new<B: Backend>(world: C, dp_size: usize, ep_size: usize) -> Result<Self, MeshError>
    where
        C: Communicator<B>,
    {
        let world_size = world.size();
        validate_mesh(world_size, dp_size, ep_size)?;
        let rank = world.rank();
        let (dp_index, ep_index) = (rank / ep_size, rank % ep_size);
        let list = |ranks: Vec<usize>| {
            ranks
                .iter()
                .map(|r| world.global_ranks()[*r].to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        // Every rank performs the same splits in the same order, as `split` requires.
        let dp_name = format!(
            "dp[{}]",
            list((0..dp_size).map(|d| d * ep_size + ep_index).collect())
        );
        let dp = world.split(ep_index, dp_index, &dp_name)?;
        let ep_name = format!(
            "ep[{}]",
            list((0..ep_size).map(|e| dp_index * ep_size + e).collect())
        );
        let ep = world.split(dp_index, ep_index, &ep_name)?;
        Ok(Self {
            world,
            dp,
            ep,
            dp_size,
            ep_size,
            dp_index,
            ep_index,
        })
    }

    /// A mesh with the given EP degree and `dp_size = world_size / ep_size`.
    ///
    /// # Errors
    /// [`MeshError::NotDivisor`] when `ep_size` does not divide the world size.
    pub fn with_ep<B: Backend>(world: C, ep_size: usize) -> Result<Self, MeshError>
    where
        C: Communicator<B>,
    {
        let world_size = world.size();
        // dp = world / ep is only meaningful when ep divides the world; validate_mesh reports the
        // zero / non-divisor cases with the numbers (dp is given as 1 just to reach those checks).
        if ep_size == 0 || !world_size.is_multiple_of(ep_size) {
            validate_mesh(world_size, 1, ep_size)?;
        }
        Self::new(world, world_size / ep_size, ep_size)
    }

    /// The whole world.
    pub fn world(&self) -> &C {
        &self.world
    }

    /// The group of ranks with this rank's EP index (varying dp index), ordered by dp index.
    pub fn dp(&self) -> &C {
        &self.dp
    }

    /// The group of ranks with this rank's dp index (varying EP index), ordered by EP index.
    pub fn ep(&self) -> &C {
        &self.ep
    }

    /// The communicator of mesh dimension `dim` (0 = dp, 1 = ep), or `None` for `dim >= 2`.
    pub fn dim_group(&self, dim: usize) -> Option<&C> {
        match dim {
            0 => Some(&self.dp),
            1 => Some(&self.ep),
            _ => None,
        }
    }

    /// Both mesh-dimension communicators in mesh order, as [`DTensor`](super::DTensor) takes them.
    pub fn dim_groups(&self) -> [&C; 2] {
        [&self.dp, &self.ep]
    }

    /// Group over which non-expert parameters are sharded: the whole mesh (see module docs).
    pub fn fsdp_group(&self) -> &C {
        &self.world
    }

    /// Group over which expert parameters are sharded and their gradients reduced: the dp group.
    pub fn expert_dp_group(&self) -> &C {
        &self.dp
    }

    /// `[dp_size, ep_size]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.dp_size, self.ep_size]
    }

    /// This rank's `[dp_index, ep_index]`.
    pub fn coords(&self) -> [usize; 2] {
        [self.dp_index, self.ep_index]
    }

    /// Data-parallel degree.
    pub fn dp_size(&self) -> usize {
        self.dp_size
    }

    /// Expert-parallel degree.
    pub fn ep_size(&self) -> usize {
        self.ep_size
    }

    /// This rank's coordinate along dp.
    pub fn dp_index(&self) -> usize {
        self.dp_index
    }

    /// This rank's coordinate along ep.
    pub fn ep_index(&self) -> usize {
        self.ep_index
    }

    /// Global rank of mesh coordinates `(dp_index, ep_index)`.
    pub fn rank_of(&self, dp_index: usize, ep_index: usize) -> usize {
        dp_index * self.ep_size + ep_index
    }

    /// Checks that `num_experts` splits evenly over the EP group; returns experts per rank.
    ///
    /// # Errors
    /// [`MeshError::Experts`] naming both numbers.
    pub fn validate_experts(&self, num_experts: usize) -> Result<usize, MeshError> {
        if num_experts == 0 || !num_experts.is_multiple_of(self.ep_size) {
            return Err(MeshError::Experts {
                num_experts,
                ep_size: self.ep_size,
            });
        }
        Ok(num_experts / self.ep_size)
    }

    /// The contiguous block of global expert indices this rank's EP index owns.
    ///
    /// # Errors
    /// As [`validate_experts`](Self::validate_experts).
    pub fn local_experts(&self, num_experts: usize) -> Result<Range<usize>, MeshError> {
        let per_rank = self.validate_experts(num_experts)?;
        Ok(self.ep_index * per_rank..(self.ep_index + 1) * per_rank)
    }
}
