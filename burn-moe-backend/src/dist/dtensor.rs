//! Sharded tensors (`DTensor`, after `torch.distributed.tensor`): a rank's local shard plus the
//! global shape and one [`Placement`] per mesh dimension.
//!
//! # Sharding rule
//!
//! Sharding follows `torch.chunk`: a length `n` split over `size` ranks uses chunks of
//! `ceil(n / size)`; rank `r` holds `[r * chunk, (r + 1) * chunk) ∩ [0, n)` ([`shard_range`]), so
//! the last shards may be smaller or **empty** (10 rows over 4 ranks → 3, 3, 3, 1; 2 rows over 3
//! ranks → 1, 1, 0). Collectives need equal sizes, so gathers pad every shard to the chunk size and
//! trim the result, and [`reduce_scatter_shard`] pads the full tensor to `chunk * size`.
//!
//! # Meshes
//!
//! A `DTensor` lives on an ordered list of communicators, one per mesh dimension: a single
//! communicator for the common 1-D case (e.g. the FSDP group), or
//! [`DeviceMesh::dim_groups`](super::DeviceMesh::dim_groups) (`[dp, ep]`) for the 2-D mesh. The
//! tensor records each group's name, size and rank, and every operation that communicates takes
//! the communicators again and checks they are the same groups (the type holds no borrow, so it
//! can be stored in a module). Several mesh dimensions sharding the same tensor dimension nest in
//! mesh order, like torch: with `[Shard(0), Shard(0)]` on `dp × ep`, dp splits the rows first and
//! ep splits each dp block.

use std::ops::Range;

use burn::tensor::{Tensor, backend::Backend};

use super::comm::{CommError, Communicator, ReduceOp};

/// How a tensor is laid out along one mesh dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Split along this tensor dimension, `torch.chunk`-style.
    Shard(usize),
    /// Every rank of the mesh dimension holds the same data.
    Replicate,
}

/// Rows of a length-`len` dimension that rank `rank` of `size` holds: chunks of
/// `ceil(len / size)`, the last ones possibly shorter or empty. `size == 0` yields `0..0`.
pub fn shard_range(len: usize, size: usize, rank: usize) -> Range<usize> {
    if size == 0 {
        return 0..0;
    }
    let chunk = len.div_ceil(size);
    let start = (rank * chunk).min(len);
    let end = (start + chunk).min(len);
    start..end
}

/// Identity of one mesh dimension's group as seen from this rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// [`Communicator::group_name`].
    pub name: String,
    /// [`Communicator::size`].
    pub size: usize,
    /// [`Communicator::rank`].
    pub rank: usize,
}

impl GroupInfo {
    fn of<B: Backend, C: Communicator<B>>(comm: &C) -> Self {
        Self {
            name: comm.group_name().to_string(),
            size: comm.size(),
            rank: comm.rank(),
        }
    }
}

/// Errors of sharded-tensor operations.
#[derive(Debug, thiserror::Error)]
pub enum DTensorError {
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// Placements and mesh groups disagree in number.
    #[error("{placements} placements for {groups} mesh groups")]
    PlacementCount { placements: usize, groups: usize },
    /// A `Shard` placement names a tensor dimension that does not exist.
    #[error(
        "placement Shard({dim}) on mesh dimension {mesh_dim} is out of range for a {rank}-d tensor"
    )]
    ShardDim {
        dim: usize,
        mesh_dim: usize,
        rank: usize,
    },
    /// A tensor does not have the shape the layout requires.
    #[error(
        "{what} has shape {actual:?}, expected {expected:?} (global shape {global:?}, placements {placements:?})"
    )]
    Shape {
        what: &'static str,
        actual: Vec<usize>,
        expected: Vec<usize>,
        global: Vec<usize>,
        placements: Vec<Placement>,
    },
    /// The communicators passed are not the ones the tensor lives on.
    #[error("the tensor lives on groups {expected:?}, but groups {actual:?} were passed")]
    Groups {
        expected: Vec<GroupInfo>,
        actual: Vec<GroupInfo>,
    },
}

/// A tensor distributed over the groups of a mesh: this rank's shard, the global shape and one
/// placement per mesh dimension. See the module documentation.
#[derive(Debug, Clone)]
pub struct DTensor<B: Backend, const D: usize> {
    local: Tensor<B, D>,
    global_shape: [usize; D],
    placements: Vec<Placement>,
    groups: Vec<GroupInfo>,
}

fn check_layout<const D: usize>(
    placements: &[Placement],
    groups: usize,
) -> Result<(), DTensorError> {
    if placements.len() != groups {
        return Err(DTensorError::PlacementCount {
            placements: placements.len(),
            groups,
        });
    }
    for (mesh_dim, p) in placements.iter().enumerate() {
        if let Placement::Shard(dim) = *p
            && dim >= D
        {
            return Err(DTensorError::ShardDim {
                dim,
                mesh_dim,
                rank: D,
            });
        }
    }
    Ok(())
}

/// Ranges of the global tensor held by the rank with `infos`' coordinates, applying mesh
/// dimensions `0..upto` of `placements` (nested in mesh order).
fn ranges_upto<const D: usize>(
    global_shape: [usize; D],
    infos: &[GroupInfo],
    placements: &[Placement],
    upto: usize,
) -> [Range<usize>; D] {
    let mut ranges: [Range<usize>; D] = std::array::from_fn(|d| 0..global_shape[d]);
    for (info, p) in infos.iter().zip(placements).take(upto) {
        if let Placement::Shard(d) = *p {
            let sub = shard_range(ranges[d].len(), info.size, info.rank);
            ranges[d] = ranges[d].start + sub.start..ranges[d].start + sub.end;
        }
    }
    ranges
}

/// `tensor[.., range, ..]` along `dim`; empty ranges give a zero-length tensor (Burn's `narrow`
/// refuses length 0), made without a kernel ([`owned_copy`] says why).
fn slice_dim<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
    dim: usize,
    range: Range<usize>,
) -> Tensor<B, D> {
    let dims = tensor.dims();
    if range.start == 0 && range.end == dims[dim] {
        return tensor;
    }
    if range.is_empty() {
        let mut shape = dims;
        shape[dim] = 0;
        return Tensor::empty(shape, (&tensor.device(), tensor.dtype()));
    }
    let ranges: [Range<usize>; D] =
        std::array::from_fn(|d| if d == dim { range.clone() } else { 0..dims[d] });
    tensor.slice(ranges)
}

/// `part` copied into a buffer of its own size, detached from any autodiff graph (a setup-time
/// copy: the caller makes it a leaf again with `set_require_grad`).
///
/// Why: Burn's slices are views (burn-cubecl offsets the parent's memory handle, ndarray shares its
/// array), so a shard or an expert range cut by `slice`/`narrow` keeps the whole tensor's buffer
/// alive and sharding would save no memory. Writing the view into a fresh tensor (one copy, at
/// setup) lets the full tensor be freed. The final `detach`: burn-autodiff marks a `slice_assign`
/// result as "gradient in backward" even when neither input is tracked, and such a tensor refuses
/// `require_grad`. An empty part (an FSDP1 rank's piece of a parameter outside its chunk, the last
/// shard of a short dimension) becomes a fresh empty tensor without any kernel: CUDA rejects a launch
/// over nothing (`CUDA_ERROR_INVALID_VALUE`), and CubeCL reports that only at a later sync — on 2
/// GPUs, FSDP1 failed a few steps after start-up with the error attributed to a collective.
pub fn owned_copy<B: Backend, const D: usize>(part: Tensor<B, D>) -> Tensor<B, D> {
    let dims = part.dims();
    if part.shape().num_elements() == 0 {
        return Tensor::empty(dims, (&part.device(), part.dtype()));
    }
    let ranges: [Range<usize>; D] = std::array::from_fn(|d| 0..dims[d]);
    Tensor::zeros(dims, (&part.device(), part.dtype())).slice_assign(ranges, part.detach()).detach()
}

/// Pads `tensor` with zeros along `dim` to length `len`.
fn pad_dim<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
    dim: usize,
    len: usize,
) -> Tensor<B, D> {
    let dims = tensor.dims();
    if dims[dim] >= len {
        return tensor;
    }
    let options = (&tensor.device(), tensor.dtype());
    let mut full = dims;
    full[dim] = len;
    if dims[dim] == 0 {
        return Tensor::zeros(full, options);
    }
    let mut pad = dims;
    pad[dim] = len - dims[dim];
    Tensor::cat(vec![tensor, Tensor::zeros(pad, options)], dim)
}

/// Reduces a full-size tensor (e.g. a gradient) over `comm` and returns this rank's shard of the
/// result along `dim` under the [`shard_range`] rule: pads `dim` to a multiple of the group size,
/// `reduce_scatter`s, and trims the padding. This is FSDP's gradient step.
///
/// # Errors
/// [`DTensorError::ShardDim`] for a bad `dim`; collective errors.
pub fn reduce_scatter_shard<B: Backend, C: Communicator<B>, const D: usize>(
    comm: &C,
    full: Tensor<B, D>,
    dim: usize,
    op: ReduceOp,
) -> Result<Tensor<B, D>, DTensorError> {
    // (A bad `dim` is the padded half's error.)
    let len = full.dims().get(dim).copied().unwrap_or(0);
    let part = reduce_scatter_shard_padded(comm, full, dim, op)?;
    Ok(trim_reduced_shard(comm, part, dim, len))
}

/// [`reduce_scatter_shard`] in two halves, for a deferred reduction
/// ([`Communicator::defer_reductions`]): pads and reduce-scatters, returning this rank's chunk as
/// the collective wrote it (padding included), so that no kernel touches it before
/// [`wait_reductions`](Communicator::wait_reductions); then [`trim_reduced_shard`] with the
/// gathered dimension's full length `len` gives `reduce_scatter_shard`'s result.
///
/// # Errors
/// [`DTensorError::ShardDim`] for a bad `dim`; collective errors.
pub fn reduce_scatter_shard_padded<B: Backend, C: Communicator<B>, const D: usize>(
    comm: &C,
    full: Tensor<B, D>,
    dim: usize,
    op: ReduceOp,
) -> Result<Tensor<B, D>, DTensorError> {
    if dim >= D {
        return Err(DTensorError::ShardDim { dim, mesh_dim: 0, rank: D });
    }
    let chunk = full.dims()[dim].div_ceil(comm.size());
    let padded = pad_dim(full, dim, chunk * comm.size());
    Ok(comm.reduce_scatter(padded, dim, op)?)
}

/// The second half of [`reduce_scatter_shard_padded`]: this rank's shard of a dimension of full
/// length `len`, without the padding (a view).
pub fn trim_reduced_shard<B: Backend, C: Communicator<B>, const D: usize>(
    comm: &C,
    part: Tensor<B, D>,
    dim: usize,
    len: usize,
) -> Tensor<B, D> {
    let own = shard_range(len, comm.size(), comm.rank()).len();
    slice_dim(part, dim, 0..own)
}

impl<B: Backend, const D: usize> DTensor<B, D> {
    fn infos<C: Communicator<B>>(groups: &[&C]) -> Vec<GroupInfo> {
        groups.iter().map(|c| GroupInfo::of::<B, C>(*c)).collect()
    }

    fn check_groups<C: Communicator<B>>(&self, groups: &[&C]) -> Result<(), DTensorError> {
        let actual = Self::infos(groups);
        if actual != self.groups {
            return Err(DTensorError::Groups {
                expected: self.groups.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// The ranges of the global tensor this rank holds under `placements` on `groups`, e.g. for a
    /// checkpoint loader that reads only its rows.
    ///
    /// # Errors
    /// [`DTensorError::PlacementCount`] / [`DTensorError::ShardDim`] for an invalid layout.
    pub fn local_ranges<C: Communicator<B>>(
        global_shape: [usize; D],
        groups: &[&C],
        placements: &[Placement],
    ) -> Result<[Range<usize>; D], DTensorError> {
        check_layout::<D>(placements, groups.len())?;
        Ok(ranges_upto(
            global_shape,
            &Self::infos(groups),
            placements,
            placements.len(),
        ))
    }

    /// Shards a tensor every rank holds in full, without communication.
    ///
    /// # Errors
    /// Invalid layout.
    pub fn distribute<C: Communicator<B>>(
        full: Tensor<B, D>,
        groups: &[&C],
        placements: &[Placement],
    ) -> Result<Self, DTensorError> {
        let global_shape = full.dims();
        let ranges = Self::local_ranges(global_shape, groups, placements)?;
        let cut = ranges.iter().zip(global_shape).any(|(r, n)| r.len() != n);
        let mut local = full;
        for (d, r) in ranges.into_iter().enumerate() {
            local = slice_dim(local, d, r);
        }
        if cut {
            local = owned_copy(local);
        }
        Ok(Self {
            local,
            global_shape,
            placements: placements.to_vec(),
            groups: Self::infos(groups),
        })
    }

    /// Builds the shard from a function of this rank's global ranges, so no rank ever holds the
    /// full tensor (checkpoint loading).
    ///
    /// # Errors
    /// Invalid layout, or `load` returning a tensor of the wrong shape.
    pub fn from_local_fn<C: Communicator<B>, F>(
        global_shape: [usize; D],
        groups: &[&C],
        placements: &[Placement],
        load: F,
    ) -> Result<Self, DTensorError>
    where
        F: FnOnce(&[Range<usize>; D]) -> Tensor<B, D>,
    {
        let ranges = Self::local_ranges(global_shape, groups, placements)?;
        Self::from_local(load(&ranges), global_shape, groups, placements)
    }

    /// Wraps an existing local shard; its shape must be the one the layout gives this rank.
    ///
    /// # Errors
    /// Invalid layout or a local shape that does not match.
    pub fn from_local<C: Communicator<B>>(
        local: Tensor<B, D>,
        global_shape: [usize; D],
        groups: &[&C],
        placements: &[Placement],
    ) -> Result<Self, DTensorError> {
        let ranges = Self::local_ranges(global_shape, groups, placements)?;
        let expected: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        let actual = local.dims().to_vec();
        if actual != expected {
            return Err(DTensorError::Shape {
                what: "local shard",
                actual,
                expected,
                global: global_shape.to_vec(),
                placements: placements.to_vec(),
            });
        }
        Ok(Self {
            local,
            global_shape,
            placements: placements.to_vec(),
            groups: Self::infos(groups),
        })
    }

    /// This rank's shard.
    pub fn to_local(&self) -> &Tensor<B, D> {
        &self.local
    }

    /// This rank's shard, by value.
    pub fn into_local(self) -> Tensor<B, D> {
        self.local
    }

    /// Shape of the whole (logical) tensor.
    pub fn global_shape(&self) -> [usize; D] {
        self.global_shape
    }

    /// One placement per mesh dimension.
    pub fn placements(&self) -> &[Placement] {
        &self.placements
    }

    /// The groups (name, size, rank) the tensor lives on, in mesh order.
    pub fn groups(&self) -> &[GroupInfo] {
        &self.groups
    }

    /// The ranges of the global tensor this shard covers.
    pub fn ranges(&self) -> [Range<usize>; D] {
        ranges_upto(
            self.global_shape,
            &self.groups,
            &self.placements,
            self.placements.len(),
        )
    }

    /// Undoes the `Shard` placements of mesh dimensions `from..` (innermost first) with padded
    /// all-gathers; the result is sharded by mesh dimensions `..from` only.
    fn gather_from<C: Communicator<B>>(
        &self,
        local: Tensor<B, D>,
        groups: &[&C],
        from: usize,
    ) -> Result<Tensor<B, D>, DTensorError> {
        let padded = self.gather_padded_from(local, groups, from)?;
        Ok(self.unpad_from(padded, from))
    }

    /// The all-gathers of [`gather_from`](Self::gather_from) without its last cut: the outermost
    /// sharded mesh dimension's gather is returned as the collective wrote it.
    fn gather_padded_from<C: Communicator<B>>(
        &self,
        local: Tensor<B, D>,
        groups: &[&C],
        from: usize,
    ) -> Result<Tensor<B, D>, DTensorError> {
        let mut local = local;
        let mut pending: Option<(usize, usize, usize)> = None;
        for i in (from..self.placements.len()).rev() {
            if let Placement::Shard(d) = self.placements[i] {
                if let Some((j, dj, parent)) = pending.take() {
                    // A deferred gather's output may be read only after its wait, and the cut can
                    // be a copy kernel.
                    groups[j].wait_gathers()?;
                    local = slice_dim(local, dj, 0..parent);
                }
                // Length of `d` before mesh dim `i` split it.
                let parent =
                    ranges_upto(self.global_shape, &self.groups, &self.placements, i)[d].len();
                let size = groups[i].size();
                let chunk = parent.div_ceil(size);
                let padded = pad_dim(local, d, chunk);
                local = groups[i].all_gather(padded, d)?;
                pending = Some((i, d, parent));
            }
        }
        Ok(local)
    }

    /// The last cut of [`gather_from`](Self::gather_from): the padding of the outermost sharded
    /// mesh dimension at or after `from` removed.
    fn unpad_from(&self, padded: Tensor<B, D>, from: usize) -> Tensor<B, D> {
        match (from..self.placements.len()).find_map(|i| match self.placements[i] {
            Placement::Shard(d) => Some((i, d)),
            Placement::Replicate => None,
        }) {
            Some((i, d)) => {
                let parent = ranges_upto(self.global_shape, &self.groups, &self.placements, i)[d].len();
                slice_dim(padded, d, 0..parent)
            }
            None => padded,
        }
    }

    /// The whole tensor on every rank (all-gathers over every sharded mesh dimension).
    ///
    /// # Errors
    /// Wrong groups; collective errors.
    pub fn full_tensor<C: Communicator<B>>(
        &self,
        groups: &[&C],
    ) -> Result<Tensor<B, D>, DTensorError> {
        self.check_groups(groups)?;
        self.gather_from(self.local.clone(), groups, 0)
    }

    /// [`full_tensor`](Self::full_tensor) in two halves, for a prefetch: the all-gathers, the
    /// outermost one's output returned as the collective wrote it (every rank's shard padded to
    /// the same length), so that no kernel touches it and the gather may be deferred
    /// ([`Communicator::defer_gathers`]); once the group's
    /// [`wait_gathers`](Communicator::wait_gathers) has returned, [`unpad`](Self::unpad) turns it
    /// into `full_tensor`'s result. (Gathers over inner mesh dimensions are waited for here, as
    /// their outputs are cut before the next gather.)
    ///
    /// # Errors
    /// Wrong groups; collective errors.
    pub fn full_tensor_padded<C: Communicator<B>>(
        &self,
        groups: &[&C],
    ) -> Result<Tensor<B, D>, DTensorError> {
        self.check_groups(groups)?;
        self.gather_padded_from(self.local.clone(), groups, 0)
    }

    /// The second half of [`full_tensor_padded`](Self::full_tensor_padded): its result without
    /// the padding.
    pub fn unpad(&self, padded: Tensor<B, D>) -> Tensor<B, D> {
        self.unpad_from(padded, 0)
    }

    /// Changes the placements. Mesh dimensions before the first changed one keep their shards;
    /// from there on the tensor is all-gathered (innermost first) and re-sliced locally under the
    /// new placements. `Shard → Replicate` is an all-gather, `Replicate → Shard` a local slice,
    /// `Shard(a) → Shard(b)` an all-gather followed by a slice (simple; an all-to-all would move
    /// `1/size` of the data).
    ///
    /// # Errors
    /// Wrong groups, invalid new layout, collective errors.
    pub fn redistribute<C: Communicator<B>>(
        self,
        groups: &[&C],
        placements: &[Placement],
    ) -> Result<Self, DTensorError> {
        self.check_groups(groups)?;
        check_layout::<D>(placements, groups.len())?;
        let Some(first) = (0..placements.len()).find(|&i| placements[i] != self.placements[i])
        else {
            return Ok(self);
        };
        let mut local = self.gather_from(self.local.clone(), groups, first)?;
        for i in first..placements.len() {
            if let Placement::Shard(d) = placements[i] {
                let parent = ranges_upto(self.global_shape, &self.groups, placements, i)[d].len();
                let sub = shard_range(parent, self.groups[i].size, self.groups[i].rank);
                local = owned_copy(slice_dim(local, d, sub));
            }
        }
        Ok(Self {
            local,
            global_shape: self.global_shape,
            placements: placements.to_vec(),
            groups: self.groups,
        })
    }

    /// The shard (`Shard(dim)` on `comm`) of the reduction over `comm` of a full-size tensor each
    /// rank holds, e.g. a gradient; see [`reduce_scatter_shard`].
    ///
    /// # Errors
    /// Bad `dim`; collective errors.
    pub fn reduce_scatter_grad<C: Communicator<B>>(
        full: Tensor<B, D>,
        comm: &C,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Self, DTensorError> {
        let global_shape = full.dims();
        let local = reduce_scatter_shard(comm, full, dim, op)?;
        Ok(Self {
            local,
            global_shape,
            placements: vec![Placement::Shard(dim)],
            groups: vec![GroupInfo::of::<B, C>(comm)],
        })
    }
}

#[cfg(test)]
mod owned_copy_tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};

    use super::owned_copy;

    type B = Autodiff<NdArray<f32>>;

    /// The copy holds the slice's values and can become a trainable leaf (a `slice_assign` result
    /// could not: see `owned_copy`).
    #[test]
    fn owned_copy_is_an_equal_tensor_that_can_become_a_leaf() {
        let device = Default::default();
        let t = Tensor::<B, 2>::from_data(TensorData::new((0..12).map(|v| v as f32).collect::<Vec<_>>(), [4, 3]), &device).require_grad();
        let part = t.detach().slice([1..3]);
        let copy = owned_copy(part.clone());
        copy.clone().into_data().assert_eq(&part.into_data(), true);
        let leaf = copy.set_require_grad(true);
        assert!(leaf.is_require_grad());
        let grads = (leaf.clone() * 2.0).sum().backward();
        leaf.grad(&grads).unwrap().into_data().assert_eq(&TensorData::new(vec![2.0f32; 6], [2, 3]), true);
    }

    /// An empty part (an FSDP1 piece outside the rank's chunk) comes back empty, in the part's shape
    /// and dtype, untracked and able to become a leaf — made without a kernel (on CUDA a launch over
    /// nothing fails; that is checked on the GPU by `bench/parallel_gpu.sh`'s FSDP1 runs).
    #[test]
    fn owned_copy_of_an_empty_part_is_empty() {
        let device = Default::default();
        let part = Tensor::<B, 2>::empty([0, 3], &device);
        let copy = owned_copy(part.clone());
        assert_eq!((copy.dims(), copy.dtype()), ([0, 3], part.dtype()));
        assert!(!copy.is_require_grad() && copy.set_require_grad(true).is_require_grad());
    }
}
