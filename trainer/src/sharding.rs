//! Parallelism applied to the model from outside: expert parallelism (EP), FSDP2-style per-parameter
//! sharding and plain data parallelism (DDP), on a `dp × ep` [`DeviceMesh`].
//!
//! The sharding plan gives every parameter one [`ParamPlacement`]:
//! - experts (`w1`, `w3`, `w2` of each MoE layer and their LoRA adapters) with `--ep-size > 1`:
//!   [`ParamPlacement::Expert`]: the rank keeps only its `E / ep_size` experts (cut with
//!   [`DMoe::local_experts`](burn_moe_backend::DMoe::local_experts)); tokens reach them through the
//!   [`AllToAllDispatcher`]; their gradients are summed over the expert-data-parallel group.
//! - everything else under `--sharding fsdp2` (experts too when EP is off):
//!   [`ParamPlacement::Sharded`]: the rank keeps rows `shard_range(rows, world, rank)` (`Shard(0)` on
//!   the FSDP group, which is the whole mesh — with `dp_size == 1` that is the EP group, as in the
//!   original); the full tensor is all-gathered before the forward pass and its gradient
//!   reduce-scattered back onto the shard. The optimizer only ever sees shards, so its state is
//!   sharded like the parameter.
//! - everything else under `--sharding fsdp1` (experts too when EP is off): [`ParamPlacement::Flat`]:
//!   FSDP1's flat parameters. Each decoder layer is a unit (the embedding, final norm and LM head
//!   the root unit; trainable and frozen parameters in separate units, so LoRA runs never
//!   reduce-scatter frozen weights): its parameters, flattened and concatenated in module order,
//!   form one buffer padded to a multiple of the world size, and rank `r` owns the `r`-th chunk.
//!   Each unit is gathered with one all-gather and its gradient reduce-scattered with one
//!   reduce-scatter. The rank stores its chunk split at parameter boundaries (FSDP1 with
//!   `use_orig_params=True`), so the optimizer and checkpoints keep per-parameter ids.
//! - otherwise [`ParamPlacement::Replicated`]: gradients all-reduced over the world (DDP).
//!
//! When the sharded parameters are gathered ([`FsdpGather`]): by default (`auto`) once per step
//! under expert parallelism, where only the small non-expert weights are sharded, and otherwise per
//! unit — the embedding,
//! each decoder layer, the head (final norm + LM head) — just before the unit runs, freed after it
//! ([`Parallel::live_part`]; by default its all-gathers queued while the unit before it computes,
//! [`Parallel::prefetch_part`]); the backward pass gathers each layer again, re-runs its forward and
//! reduce-scatters its gradients at once (by default left running during the next unit's backward
//! pass, [`PartReducer`]); the schedule is driven by
//! [`crate::layerwise`]. Burn's autodiff keeps every tensor an operation saved for its backward
//! step until that step has run, and a layer's weights are such tensors: the only way to let them
//! go after the forward pass is not to keep the layer's graph, hence the re-run (PyTorch's FSDP
//! with activation checkpointing does the same work). `--fsdp-gather step` gathers the whole model
//! once per optimizer step instead ([`Parallel::materialize`]) and keeps it through the step.

use std::collections::HashMap;
use std::ops::Range;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, FloatDType, Shape, Tensor};
use burn::tensor::backend::AutodiffBackend;
use burn_moe_backend::dist::{
    CollectiveBackend, CommError, Communicator, DTensor, DTensorError, DeviceMesh, GraphComm, MeshError, Placement,
    ReduceOp, reduce_scatter_shard, reduce_scatter_shard_padded, shard_range, trim_reduced_shard,
};
use burn_moe_backend::{AllToAllDispatcher, ComputeCopies, LocalDispatcher, MoeBackend, TokenDispatcher};
use mixtral_burn::{LazyWeights, MixtralForCausalLM};

/// How non-expert parameters are distributed (`--sharding`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// Parameters replicated on every rank; with several ranks gradients are all-reduced (as DDP).
    None,
    /// Data parallel: replicated parameters, gradient all-reduce.
    #[default]
    Ddp,
    /// FSDP1-style flat-parameter units per decoder layer.
    Fsdp1,
    /// FSDP2-style per-parameter `Shard(0)` on the FSDP group.
    Fsdp2,
}

/// When FSDP gathers sharded parameters (`--fsdp-gather`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsdpGather {
    /// Per unit (embedding, each decoder layer, head), just before it runs, in the forward and
    /// again in the backward pass; at most one unit is whole at a time.
    Layer,
    /// The whole model once per optimizer step, kept until the step's last backward pass.
    Step,
    /// Per unit as `layer`, and each unit's all-gathers are queued before the unit before it runs,
    /// so the transfer overlaps that unit's compute (FSDP's forward and backward prefetch): two
    /// units are whole at a time (three while the head's and the last layer's backward passes
    /// run). Each unit's gradient reduce-scatters likewise run during the next unit's backward
    /// pass ([`PartReducer`]). On NCCL; the in-process collectives complete at once, so there it is `layer`.
    /// 2-5% faster per step than `layer` on 2 H200s (another 9% for FSDP2 with the deferred
    /// reductions), for about one more unit of memory.
    Prefetch,
    /// The default: `step` under expert parallelism, `prefetch` otherwise (and with
    /// `--gradient-checkpointing`, which runs per unit). With EP the gathered
    /// weights are only the non-expert ones (attention, norms, routers, embeddings: ~1.6 B of
    /// Mixtral-8x7B's 47 B), so holding them through the step costs little, while the per-unit
    /// schedule re-runs every layer's forward: 8 Mixtral-shaped layers, EP=2 + FSDP2 on 2 H200s,
    /// `step` took 0.30 s/step and 93 GB of live tensors, `prefetch` 0.40 s and 96 GB.
    #[default]
    Auto,
}

impl FsdpGather {
    /// `Auto` made concrete for a mesh with expert-parallel degree `ep_size`, with or without
    /// per-layer recomputation ([`Parallel::with_layer_recompute`]); the others as they are.
    #[must_use]
    pub fn resolve(self, ep_size: usize, recompute: bool) -> Self {
        match self {
            Self::Auto if ep_size > 1 && !recompute => Self::Step,
            Self::Auto => Self::Prefetch,
            other => other,
        }
    }
}

/// Where one parameter lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamPlacement {
    /// Whole on every rank; gradient all-reduced over the world.
    Replicated,
    /// `Shard(0)` over the world; `dims` is the full shape.
    Sharded {
        /// Global shape.
        dims: Vec<usize>,
    },
    /// This rank's experts only; gradient all-reduced over the expert-data-parallel group.
    Expert,
    /// A member of flat unit `unit`: elements `offset..offset + numel(dims)` of the unit's buffer;
    /// this rank holds elements `piece` of the flattened parameter (as `[piece.len(), 1, …]`).
    Flat {
        /// Index into the plan's units.
        unit: usize,
        /// Global shape.
        dims: Vec<usize>,
        /// First element in the unit buffer.
        offset: usize,
        /// This rank's elements of the flattened parameter.
        piece: Range<usize>,
    },
}

/// One FSDP1 flat-parameter unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatUnit {
    /// `layer3`, `root`, with `/frozen` for frozen parameters.
    pub name: String,
    /// Elements of all members.
    pub numel: usize,
    /// Elements per rank (`ceil(numel / world)`; the buffer is padded to `chunk · world`).
    pub chunk: usize,
    /// Whether its members are trained.
    pub trainable: bool,
}

/// Errors of setting up or running the parallel plan.
#[derive(Debug, thiserror::Error)]
pub enum ShardingError {
    /// The degrees do not fit the world or the experts.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// Gathering or scattering a sharded parameter failed.
    #[error(transparent)]
    Shard(#[from] DTensorError),
    /// A combination that is not available.
    #[error("{0}")]
    Unsupported(String),
}

/// One rank's view of the parallel plan: mesh groups, the EP dispatcher, every parameter's placement.
pub struct Parallel<B: AutodiffBackend + CollectiveBackend<Wire = B::InnerBackend>, C: Communicator<B::InnerBackend>> {
    sharding: Sharding,
    mesh: DeviceMesh<C>,
    dispatcher: Option<AllToAllDispatcher<B>>,
    placements: HashMap<ParamId, ParamPlacement>,
    units: Vec<FlatUnit>,
    /// Mixed precision: the dtype the forward pass computes in (f32 masters stay here).
    compute: Option<FloatDType>,
    /// Experts per MoE layer of the model this plan is for (EP: this rank's range of them is
    /// [`expert_range`](Self::expert_range)).
    num_experts: usize,
    /// When FSDP gathers: `requested` resolved for this mesh.
    gather: FsdpGather,
    /// What `--fsdp-gather` asked for.
    requested: FsdpGather,
    /// Each decoder layer's forward runs again in the backward pass (`--gradient-checkpointing`).
    recompute: bool,
    /// Mixed precision with the fused AdamW: the weights its last update left rounded to `compute`.
    copies: Option<ComputeCopies<B::InnerBackend>>,
}

/// The part of one parameter's global tensor a rank stores (see [`Parallel::local_piece`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPiece {
    /// Global shape of the parameter.
    pub global_dims: Vec<usize>,
    /// Which elements of the global tensor the rank stores.
    pub region: crate::rank_shards::Region,
    /// Whether this rank writes the piece into its checkpoint shard: the first rank of the piece's
    /// replica group (rank 0 of the world for replicated parameters, the first expert-data-parallel
    /// rank for experts); never for an empty piece.
    pub owner: bool,
}

impl<B, C> Parallel<B, C>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend> + 'static,
{
    /// Builds the mesh (`dp = world / ep`) and, with `ep_size > 1`, the EP group's dispatcher.
    /// Every rank of `world` must call it with the same arguments.
    ///
    /// # Errors
    /// [`ShardingError::Mesh`] with the numbers when `ep_size` does not divide the world size or the
    /// number of experts.
    pub fn new(world: &C, sharding: Sharding, ep_size: usize, num_experts: usize) -> Result<Self, ShardingError> {
        // The mesh owns its groups; a duplicate of the world keeps `world` usable by the caller.
        let dup = world.split(0, world.rank(), world.group_name())?;
        let mesh = DeviceMesh::with_ep::<B::InnerBackend>(dup, ep_size)?;
        mesh.validate_experts(num_experts)?;
        let dispatcher = if ep_size > 1 {
            // The dispatcher keeps its own handle on the EP group (it lives in the autodiff graph).
            let ep = mesh.world().split(mesh.dp_index(), mesh.ep_index(), mesh.ep().group_name())?;
            Some(AllToAllDispatcher::new(GraphComm::new(ep)))
        } else {
            None
        };
        Ok(Self {
            sharding,
            mesh,
            dispatcher,
            placements: HashMap::new(),
            units: Vec::new(),
            compute: None,
            num_experts,
            gather: FsdpGather::Auto.resolve(ep_size, false),
            requested: FsdpGather::Auto,
            recompute: false,
            copies: None,
        })
    }

    /// With expert parallelism, the experts this rank holds (the same range [`shard`](Self::shard)
    /// cuts), so that a checkpoint can be read for those experts only; `None` without EP.
    pub fn expert_range(&self) -> Option<Range<usize>> {
        let ep = self.mesh.ep_size();
        (ep > 1).then(|| burn_moe_backend::experts_of_rank(self.num_experts, ep, self.mesh.ep_index()))
    }

    /// Mixed precision: [`materialize`](Self::materialize) rounds every parameter to `compute`
    /// (before gathering, so sharded weights travel at that width too).
    #[must_use]
    pub fn with_compute_dtype(mut self, compute: Option<FloatDType>) -> Self {
        self.compute = compute;
        self
    }

    /// The compute copies the optimizer leaves ([`burn_moe_backend::FusedAdamW::init_with_copies`]),
    /// which [`materialize`](Self::materialize) takes instead of casting the weights again.
    #[must_use]
    pub fn with_compute_copies(mut self, copies: Option<ComputeCopies<B::InnerBackend>>) -> Self {
        self.copies = copies;
        self
    }

    /// Whether [`materialize`](Self::materialize) rounds every weight whole, as it is stored (no
    /// FSDP gather): only then are the optimizer's compute copies used, so other plans do not keep them.
    pub fn rounds_whole_weights(&self) -> bool {
        !matches!(self.sharding, Sharding::Fsdp1 | Sharding::Fsdp2)
    }

    /// Whether parameter `id`'s gradient is summed over ranks before the update (it is then widened
    /// to f32 first under mixed precision): sharded and flat parameters, replicated ones on more
    /// than one rank, experts with more than one expert-data-parallel replica.
    pub fn reduces_grad(&self, id: ParamId) -> bool {
        match self.placements.get(&id) {
            Some(ParamPlacement::Sharded { .. } | ParamPlacement::Flat { .. }) => true,
            Some(ParamPlacement::Expert) => self.mesh.expert_dp_group().size() > 1,
            Some(ParamPlacement::Replicated) | None => self.mesh.fsdp_group().size() > 1,
        }
    }

    /// Whether parameter `id`'s gradient goes to f32 before it is summed or updated, under mixed
    /// precision: always, unless `keep_narrow` (the optimizer widens in its own pass and nothing
    /// else sums the gradient: one micro-batch per step) — then only where ranks sum it
    /// ([`reduces_grad`](Self::reduces_grad)).
    pub fn widens_grad(&self, id: ParamId, keep_narrow: bool) -> bool {
        !keep_narrow || self.reduces_grad(id)
    }

    /// When FSDP gathers (`--fsdp-gather`; by default [`FsdpGather::Auto`], resolved for this mesh).
    #[must_use]
    pub fn with_fsdp_gather(mut self, gather: FsdpGather) -> Self {
        self.requested = gather;
        self.gather = gather.resolve(self.mesh.ep_size(), self.recompute);
        self
    }

    /// Activation recomputation per decoder layer (`--gradient-checkpointing`, HF's
    /// `checkpoint(layer)`): training runs [`crate::layerwise`]'s per-unit schedule under every
    /// plan, which keeps only each layer's input through the forward pass and runs the layer again,
    /// with its graph, in the backward pass. The activations of one layer are alive at a time
    /// instead of every layer's, for one more forward pass per step. Under FSDP the per-unit
    /// gathers come with it (`--fsdp-gather auto` then means `prefetch` under EP too).
    #[must_use]
    pub fn with_layer_recompute(mut self, on: bool) -> Self {
        self.recompute = on;
        self.gather = self.requested.resolve(self.mesh.ep_size(), on);
        self
    }

    /// Whether training and evaluation run the per-unit schedule of [`crate::layerwise`] (FSDP
    /// with `--fsdp-gather layer|prefetch`, or any plan with
    /// [`with_layer_recompute`](Self::with_layer_recompute)) instead of one forward pass over a
    /// [`materialize`]d model.
    ///
    /// [`materialize`]: Self::materialize
    pub fn per_layer(&self) -> bool {
        self.recompute || (matches!(self.gather, FsdpGather::Layer | FsdpGather::Prefetch) && matches!(self.sharding, Sharding::Fsdp1 | Sharding::Fsdp2))
    }

    /// The compute dtype under mixed precision.
    pub fn compute_dtype(&self) -> Option<FloatDType> {
        self.compute
    }

    /// The expert dispatcher every MoE layer uses.
    pub fn dispatcher(&self) -> &dyn TokenDispatcher<B> {
        match &self.dispatcher {
            Some(d) => d,
            None => &LocalDispatcher,
        }
    }

    /// Whether every rank must run every micro-batch's forward and backward (collectives inside the
    /// model), even on an empty slice of the batch.
    pub fn lockstep(&self) -> bool {
        // Per-layer gathers are collectives inside the forward pass too.
        self.dispatcher.is_some() || (self.per_layer() && self.mesh.fsdp_group().size() > 1)
    }

    /// Whether parameters are sharded (checkpoints then hold per-rank weight shards and optimizer state).
    pub fn is_sharded(&self) -> bool {
        self.mesh.ep_size() > 1 || matches!(self.sharding, Sharding::Fsdp1 | Sharding::Fsdp2)
    }

    /// The FSDP1 units (empty for the other plans).
    pub fn units(&self) -> &[FlatUnit] {
        &self.units
    }

    /// The sizes of the whole-unit buffers a training step allocates under FSDP1, once per unit and
    /// micro-batch: each unit gathered in the wire dtype, each trained unit's gradient in f32
    /// before its reduce-scatter (`chunk · world` elements each). Empty for the other plans. For
    /// [`burn_moe_backend::persistent_sizes`]: a Mixtral layer's gradient is 5.8 GB.
    pub fn unit_buffer_sizes(&self) -> Vec<(usize, DType)> {
        let world = self.mesh.fsdp_group().size();
        let wire = DType::from(wire_dtype(self.compute));
        let mut sizes: Vec<(usize, DType)> = Vec::new();
        for unit in &self.units {
            let whole = unit.chunk * world;
            let dtypes = if unit.trainable { vec![wire, DType::F32] } else { vec![wire] };
            for dtype in dtypes {
                if !sizes.contains(&(whole, dtype)) {
                    sizes.push((whole, dtype));
                }
            }
        }
        sizes
    }

    /// Which part of the global tensor of parameter `id` (stored here with shape `local_dims`) this
    /// rank holds after [`shard`](Self::shard), in global coordinates: FSDP2 rows and EP expert
    /// ranges as blocks (dimension 0 cut), FSDP1 pieces as ranges of the row-major flattened
    /// tensor, replicated parameters as the whole tensor. `None` for a parameter the plan does not
    /// know (an unsharded run).
    pub fn local_piece(&self, id: ParamId, local_dims: &[usize]) -> Option<LocalPiece> {
        use crate::rank_shards::Region;
        let block = |global: Vec<usize>, start: usize, len: usize| {
            let mut offsets = vec![0; global.len()];
            let mut lengths = global.clone();
            if let (Some(o), Some(l)) = (offsets.first_mut(), lengths.first_mut()) {
                (*o, *l) = (start, len);
            }
            Region::Block { offsets, lengths }
        };
        let world = self.mesh.fsdp_group();
        let numel: usize = local_dims.iter().product();
        Some(match self.placements.get(&id)? {
            ParamPlacement::Replicated => LocalPiece {
                global_dims: local_dims.to_vec(),
                region: block(local_dims.to_vec(), 0, local_dims.first().copied().unwrap_or(1)),
                owner: world.rank() == 0 && numel > 0,
            },
            ParamPlacement::Sharded { dims } => {
                let rows = shard_range(dims[0], world.size(), world.rank());
                LocalPiece { global_dims: dims.clone(), region: block(dims.clone(), rows.start, rows.len()), owner: !rows.is_empty() && numel > 0 }
            }
            ParamPlacement::Expert => {
                let (num_experts, range) = (self.num_experts, self.expert_range()?);
                let mut global = local_dims.to_vec();
                global[0] = num_experts;
                LocalPiece {
                    region: block(global.clone(), range.start, range.len()),
                    global_dims: global,
                    owner: self.mesh.expert_dp_group().rank() == 0 && numel > 0,
                }
            }
            ParamPlacement::Flat { dims, piece, .. } => LocalPiece {
                global_dims: dims.clone(),
                region: Region::Flat { offset: piece.start, length: piece.len() },
                owner: !piece.is_empty(),
            },
        })
    }

    /// `fsdp2`, `ep2`, `fsdp2+ep2`, ... for logs and checkpoint metadata.
    pub fn describe(&self) -> String {
        let base = match self.sharding {
            Sharding::None => "none",
            Sharding::Ddp => "ddp",
            Sharding::Fsdp1 => "fsdp1",
            Sharding::Fsdp2 => "fsdp2",
        };
        if self.mesh.ep_size() > 1 {
            format!("{base}+ep{}(dp{})", self.mesh.ep_size(), self.mesh.dp_size())
        } else {
            base.to_owned()
        }
    }

    /// The first error recorded by a collective inside the model (forward or backward).
    ///
    /// # Errors
    /// That [`CommError`].
    pub fn check(&self) -> Result<(), CommError> {
        match &self.dispatcher {
            Some(d) => d.comm().check(),
            None => Ok(()),
        }
    }

    /// Applies the plan to a full model (the same on every rank): cuts the experts (EP), shards the
    /// rest (FSDP2) and records every parameter's placement. Parameter ids are kept.
    pub fn shard(&mut self, model: MixtralForCausalLM<B>) -> MixtralForCausalLM<B> {
        self.shard_lazy(model, &LazyWeights::default())
    }

    /// Like [`shard`](Self::shard), for a model loaded with
    /// [`HfCheckpoint::load_model_lazy`](mixtral_burn::HfCheckpoint::load_model_lazy): each lazy
    /// parameter is asked for this rank's piece only (FSDP2 rows, an FSDP1 range of the flattened
    /// tensor) before it is read, so the rank never holds a whole sharded parameter, let alone the
    /// whole model. Replicated parameters are read whole; afterwards no parameter is lazy.
    pub fn shard_lazy(&mut self, model: MixtralForCausalLM<B>, lazy: &LazyWeights) -> MixtralForCausalLM<B> {
        let ep = self.mesh.ep_size();
        let mut model = model;
        if let Some(range) = self.expert_range() {
            let num_experts = self.num_experts;
            for layer in &mut model.model.layers {
                // A layer loaded with only this rank's experts
                // (`HfCheckpoint::load_model_with_experts(.., self.expert_range())`) is kept as is.
                let held = layer.mlp.w1.lazy_shape()[0];
                if held == num_experts {
                    // Lazy expert weights (LoRA on the experts loads every expert, see the trainer)
                    // read only this rank's experts; the rest is sliced as usual.
                    let cut = |p: &Param<Tensor<B, 3>>| {
                        if p.is_initialized() || !lazy.contains(p.id) {
                            return burn_moe_backend::dmoe::slice_experts(p, range.clone());
                        }
                        let [_, rows, cols] = p.lazy_shape().dims();
                        lazy.request_piece(p.id, range.start * rows * cols..range.end * rows * cols, vec![range.len(), rows, cols]);
                        // The clone takes the request: it reads the piece, the original is dropped unread.
                        p.clone().map(|t| t)
                    };
                    layer.mlp = layer.mlp.local_experts_by(range.clone(), cut);
                } else {
                    assert_eq!(held, range.len(), "a MoE layer holds {held} experts: neither all {num_experts} nor this rank's {range:?}");
                }
            }
        }
        let world = self.mesh.fsdp_group();
        let (size, rank) = (world.size(), world.rank());
        let mut units = Vec::new();
        let mut unit_index = HashMap::new();
        if self.sharding == Sharding::Fsdp1 {
            let mut sizes = UnitSizes { ep: ep > 1, path: Vec::new(), units: Vec::new(), index: HashMap::new(), lazy };
            model.visit(&mut sizes);
            units = sizes
                .units
                .into_iter()
                .map(|(name, numel, trainable)| FlatUnit { name, numel, chunk: numel.div_ceil(size), trainable })
                .collect();
            unit_index = sizes.index;
        }
        let mut mapper = PlanMapper {
            sharding: self.sharding,
            ep: ep > 1,
            size,
            rank,
            path: Vec::new(),
            placements: HashMap::new(),
            units: &units,
            unit_index,
            filled: vec![0; units.len()],
            lazy,
        };
        let model = model.map(&mut mapper);
        self.placements = mapper.placements;
        self.units = units;
        model
    }

    /// The model the forward pass runs: sharded parameters all-gathered into full tensors that are
    /// fresh autodiff leaves (with the shard's id and trainability), everything else as is — or,
    /// under mixed precision, every parameter as a fresh leaf in the compute dtype.
    ///
    /// # Errors
    /// A failed gather.
    pub fn materialize(&self, model: &MixtralForCausalLM<B>) -> Result<MixtralForCausalLM<B>, ShardingError> {
        self.gather_where(model, self.compute, false)
    }

    /// The whole model with its sharded parameters gathered ([`gather_part`](Self::gather_part)),
    /// leaving frozen parameters (and FSDP1's frozen units) sharded when `skip_frozen`; a clone
    /// (rounded to `compute`) when nothing is sharded.
    fn gather_where(&self, model: &MixtralForCausalLM<B>, compute: Option<FloatDType>, skip_frozen: bool) -> Result<MixtralForCausalLM<B>, ShardingError> {
        if !self.placements.values().any(|p| matches!(p, ParamPlacement::Sharded { .. } | ParamPlacement::Flat { .. })) {
            return Ok(match compute {
                Some(c) => crate::precision::compute_copy(model.clone(), c, self.copies.as_ref()),
                None => model.clone(),
            });
        }
        self.gather_part(model, model.clone(), compute, skip_frozen, true)
    }

    /// `part` (a unit of `model`: its embedding, one decoder layer, or a module holding the final norm
    /// and LM head) with its sharded parameters gathered, for the per-layer schedule: with `track`,
    /// trainable parameters are fresh autodiff leaves keyed by the shard's id (their gradients go to
    /// [`PartReducer::add`]); without, every parameter is untracked and the pass keeps no graph.
    /// Under mixed precision every parameter comes in the compute dtype. FSDP1 gathers each flat
    /// unit with members in `part` whole (the root unit's members lie in several parts), reading
    /// this rank's pieces from `model`. Collective over the FSDP group: every rank passes the same
    /// part.
    ///
    /// # Errors
    /// A failed gather.
    pub fn live_part<M: Module<B>>(&self, model: &MixtralForCausalLM<B>, part: M, track: bool) -> Result<M, ShardingError> {
        self.gather_part(model, part, self.compute, false, track)
    }

    /// [`live_part`](Self::live_part) in two halves, for `--fsdp-gather prefetch`: queues `part`'s
    /// all-gathers deferred (they run beside whatever is queued next), and
    /// [`wait_part`](Self::wait_part) waits for them and returns the unit. Under any other
    /// schedule nothing happens until `wait_part`, which then gathers (so `layer` keeps one unit
    /// whole at a time). Collective like `live_part`; between the halves the caller may run
    /// anything, other collectives included, but every rank prefetches the same parts in the same
    /// order.
    ///
    /// # Errors
    /// A failed gather.
    pub fn prefetch_part<M: Module<B>>(&self, model: &MixtralForCausalLM<B>, part: M, track: bool) -> Result<Gathering<B, M>, ShardingError> {
        if self.gather != FsdpGather::Prefetch {
            return Ok(Gathering { part, track, compute: self.compute, skip_frozen: false, queued: None });
        }
        let world = self.mesh.fsdp_group();
        world.defer_gathers(true);
        let started = self.start_gather(model, part, self.compute, false, track);
        world.defer_gathers(false);
        started
    }

    /// The second half of [`prefetch_part`](Self::prefetch_part).
    ///
    /// # Errors
    /// A gather that failed or timed out.
    pub fn wait_part<M: Module<B>>(&self, model: &MixtralForCausalLM<B>, pending: Gathering<B, M>) -> Result<M, ShardingError> {
        if pending.queued.is_none() {
            return self.gather_part(model, pending.part, pending.compute, pending.skip_frozen, pending.track);
        }
        self.mesh.fsdp_group().wait_gathers()?;
        self.finish_gather(pending)
    }

    /// `part` of `model` with its sharded parameters gathered (FSDP2 shards cast to `compute`, or
    /// f32, and all-gathered; each FSDP1 unit with members in `part` all-gathered whole, one
    /// collective per unit in unit order, its pieces read from `model`); with `compute`, the other
    /// parameters rounded to it. `skip_frozen` leaves frozen parameters (and frozen units) as they
    /// are; `track` as in [`live_part`](Self::live_part).
    fn gather_part<M: Module<B>>(
        &self,
        model: &MixtralForCausalLM<B>,
        part: M,
        compute: Option<FloatDType>,
        skip_frozen: bool,
        track: bool,
    ) -> Result<M, ShardingError> {
        let started = self.start_gather(model, part, compute, skip_frozen, track)?;
        self.finish_gather(started)
    }

    /// The collectives of [`gather_part`](Self::gather_part): every output as the all-gather wrote
    /// it (no kernel touches one, so the gathers may be deferred).
    fn start_gather<M: Module<B>>(
        &self,
        model: &MixtralForCausalLM<B>,
        part: M,
        compute: Option<FloatDType>,
        skip_frozen: bool,
        track: bool,
    ) -> Result<Gathering<B, M>, ShardingError> {
        let world = self.mesh.fsdp_group();
        let wire = wire_dtype(compute);
        let device = model.lm_head.weight.val().device();
        let mut touched = UnitsOf { placements: &self.placements, units: std::collections::BTreeSet::new() };
        part.visit(&mut touched);
        let mut flats: Vec<Tensor<B::InnerBackend, 1>> = (0..self.units.len()).map(|_| Tensor::empty([0], &device)).collect();
        // Every rank skips the same frozen units: trainability is part of the plan.
        for unit in touched.units.into_iter().filter(|&u| !skip_frozen || self.units[u].trainable) {
            flats[unit] = world.all_gather(self.unit_chunk(model, unit, wire), 0)?;
        }
        let mut shards = StartShards { placements: &self.placements, world, wire, skip_frozen, padded: HashMap::new(), error: None, _backend: std::marker::PhantomData };
        part.visit(&mut shards);
        if let Some(e) = shards.error {
            return Err(e);
        }
        Ok(Gathering { part, track, compute, skip_frozen, queued: Some(Queued { flats, padded: shards.padded }) })
    }

    /// The unit out of [`start_gather`](Self::start_gather)'s outputs, once they are complete.
    fn finish_gather<M: Module<B>>(&self, started: Gathering<B, M>) -> Result<M, ShardingError> {
        let Gathering { part, track, compute, skip_frozen, queued } = started;
        let Some(Queued { flats, padded }) = queued else {
            return Err(ShardingError::Unsupported("a unit was used before its gathers were started".into()));
        };
        let mut gather = Gather { placements: &self.placements, flats, padded, compute, skip_frozen, track, copies: self.copies.as_ref(), error: None };
        let live = part.map(&mut gather);
        match gather.error {
            Some(e) => Err(e),
            None => Ok(live),
        }
    }

    /// This rank's chunk of FSDP1 unit `unit`'s flat buffer: its pieces, read from `model` in `wire`
    /// dtype, concatenated and padded to the unit's chunk length (what the unit's all-gather sends).
    fn unit_chunk(&self, model: &MixtralForCausalLM<B>, unit: usize, wire: FloatDType) -> Tensor<B::InnerBackend, 1> {
        let mut pieces = CollectPieces { placements: &self.placements, unit, pieces: Vec::new(), wire };
        model.visit(&mut pieces);
        let device = model.lm_head.weight.val().device();
        pad_to(pieces.pieces, self.units[unit].chunk, &device, wire)
    }

    /// Turns the accumulated gradients of the materialized model into gradients of this rank's
    /// parameters: reduce-scatter (sharded), all-reduce over the world (replicated, when there are
    /// several ranks) or over the expert-data-parallel group (experts). A parameter without a
    /// gradient on this rank (an expert that got no token) counts as zero, so every rank joins the
    /// same collectives in the same order.
    ///
    /// Under the per-layer schedule ([`per_layer`](Self::per_layer)) the sharded gradients were
    /// reduce-scattered by [`PartReducer`] already; only replicated and expert gradients are
    /// reduced here.
    ///
    /// # Errors
    /// A failed collective.
    pub fn sync_grads(&self, model: &MixtralForCausalLM<B>, grads: &mut GradientsParams) -> Result<(), ShardingError> {
        let world = self.mesh.fsdp_group();
        let mut sync = SyncGrads {
            placements: &self.placements,
            world,
            expert_dp: self.mesh.expert_dp_group(),
            grads,
            flat: vec![Vec::new(); self.units.len()],
            skip_sharded: self.per_layer(),
            error: None,
        };
        model.visit(&mut sync);
        if let Some(e) = sync.error {
            return Err(e);
        }
        let SyncGrads { grads, flat, .. } = sync;
        // FSDP1: one reduce-scatter per trainable unit, then the chunk is cut back into pieces.
        let device = model.lm_head.weight.val().device();
        let mut chunks = Vec::with_capacity(self.units.len());
        for (unit, parts) in self.units.iter().zip(flat) {
            if !unit.trainable || self.per_layer() {
                chunks.push(None);
                continue;
            }
            let full = pad_to(parts, unit.chunk * world.size(), &device, FloatDType::F32);
            chunks.push(Some(world.reduce_scatter(full, 0, ReduceOp::Sum)?));
        }
        model.visit(&mut RegisterPieces { placements: &self.placements, units: &self.units, chunks, rank: world.rank(), grads });
        Ok(())
    }

    /// Global L2 norm of the gradients over all ranks (each element counted once: replicated
    /// parameters are divided by the world size, experts by the expert-dp size), as `clip_grad_norm_`
    /// computes it on the unsharded model. The clipping factor ([`clip_factor`]) is applied by the
    /// optimizer's update pass ([`burn_moe_backend::GradScale`]), not here.
    ///
    /// # Errors
    /// A failed all-reduce.
    pub fn grad_norm(&self, model: &MixtralForCausalLM<B>, grads: &GradientsParams, device: &B::Device) -> Result<f64, CommError>
    where
        B::InnerBackend: MoeBackend,
    {
        let world = self.mesh.fsdp_group();
        let (world_size, dp) = (world.size() as f64, self.mesh.dp_size() as f64);
        let mut sum = SumSquares::<B::InnerBackend> { grads, placements: &self.placements, world_size, dp, total: None };
        model.visit(&mut sum);
        // One device-to-host read for the whole model (a read per parameter drained the GPU queue
        // each time).
        let total = sum.total.map_or(0.0, |t| t.into_data().iter::<f64>().next().unwrap_or(0.0));
        let total = if world.size() > 1 {
            crate::parallel::all_reduce_scalars::<B::InnerBackend, C>(&[total], world, device)?[0]
        } else {
            total
        };
        Ok(total.sqrt())
    }

    /// The full model on every rank (sharded parameters gathered, experts gathered over the EP group),
    /// for saving and evaluation; a clone when nothing is sharded. Collective: every rank must call it.
    ///
    /// # Errors
    /// A failed collective.
    pub fn consolidate(&self, model: &MixtralForCausalLM<B>) -> Result<MixtralForCausalLM<B>, ShardingError> {
        self.consolidate_where(model, false)
    }

    /// Like [`consolidate`](Self::consolidate), but only the trainable parameters are gathered (the
    /// LoRA adapters of a LoRA run); frozen ones stay as this rank's shards. For exporting adapters
    /// without ever holding the whole base model. Collective: every rank must call it.
    ///
    /// # Errors
    /// A failed collective.
    pub fn consolidate_trainable(&self, model: &MixtralForCausalLM<B>) -> Result<MixtralForCausalLM<B>, ShardingError> {
        self.consolidate_where(model, true)
    }

    /// Writes the consolidated model (`model.safetensors` in HF's classic layout, f32, and
    /// `config.json`) into `dir` on the rank that passes `Some`, gathering one parameter at a time
    /// (FSDP1: one unit at a time) instead of the whole model: no rank holds more than a decoder
    /// layer beyond its own shards. Collective: every rank must call it (the others with `None`).
    ///
    /// # Errors
    /// A failed collective or write ([`mixtral_burn::checkpoint::CheckpointError`]).
    pub fn save_consolidated(
        &self,
        model: &MixtralForCausalLM<B>,
        config: &mixtral_burn::MixtralConfig,
        dir: Option<&std::path::Path>,
    ) -> Result<(), mixtral_burn::checkpoint::CheckpointError> {
        self.save_gathered(model, None, config, dir)
    }

    /// [`save_consolidated`](Self::save_consolidated) of the model with its LoRA adapters folded in
    /// (`W + s·B·A`, in f32, as `merge_lora`), the `--merge-lora` export of a sharded run: each base
    /// weight is gathered, then the adapter taken from `adapters` (a model whose adapters are whole,
    /// from [`consolidate_trainable`](Self::consolidate_trainable)) is added. Collective.
    ///
    /// # Errors
    /// As [`save_consolidated`](Self::save_consolidated).
    pub fn save_merged(
        &self,
        model: &MixtralForCausalLM<B>,
        adapters: &MixtralForCausalLM<B>,
        config: &mixtral_burn::MixtralConfig,
        dir: Option<&std::path::Path>,
    ) -> Result<(), mixtral_burn::checkpoint::CheckpointError> {
        self.save_gathered(model, Some(adapters), config, dir)
    }

    fn save_gathered(
        &self,
        model: &MixtralForCausalLM<B>,
        adapters: Option<&MixtralForCausalLM<B>>,
        config: &mixtral_burn::MixtralConfig,
        dir: Option<&std::path::Path>,
    ) -> Result<(), mixtral_burn::checkpoint::CheckpointError> {
        use mixtral_burn::checkpoint::{HfLayout, SaveDtype, save_hf_with};
        let folds = adapters.map(folds_of).unwrap_or_default();
        let mut fetch = GatherFetch { parallel: self, model, folds, unit: None, error: None };
        save_hf_with(model, config, dir, HfLayout::Classic, SaveDtype::F32, &mut fetch)
    }

    fn consolidate_where(&self, model: &MixtralForCausalLM<B>, skip_frozen: bool) -> Result<MixtralForCausalLM<B>, ShardingError> {
        if !self.is_sharded() {
            return Ok(model.clone());
        }
        let full = self.gather_where(model, None, skip_frozen)?;
        let mut gather = GatherExperts { placements: &self.placements, ep: self.mesh.ep(), skip_frozen, error: None };
        let full = full.map(&mut gather);
        match gather.error {
            Some(e) => Err(e),
            None => Ok(full),
        }
    }
}

/// `(field, parent container type)` of the modules entered by a visitor or mapper.
type ModulePath = Vec<(String, String)>;

/// The expert weights are a DMoe's fields other than the router (`gate`), adapters included.
fn is_expert(path: &ModulePath) -> bool {
    path.iter().any(|(name, container)| container == "Struct:DMoe" && name != "gate")
}

/// FSDP1 unit of a parameter: its decoder layer or the root, split by trainability.
fn unit_name(path: &ModulePath, trainable: bool) -> String {
    let layer = path.windows(2).find(|w| w[0].0 == "layers").map(|w| w[1].0.clone());
    let base = layer.map_or_else(|| "root".to_owned(), |i| format!("layer{i}"));
    if trainable { base } else { format!("{base}/frozen") }
}

/// Sizes the FSDP1 units (first pass over the model; reads no lazy parameter).
struct UnitSizes<'a> {
    ep: bool,
    path: ModulePath,
    /// `(name, numel, trainable)` in first-seen order.
    units: Vec<(String, usize, bool)>,
    index: HashMap<String, usize>,
    lazy: &'a LazyWeights,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for UnitSizes<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.to_owned(), container_type.to_owned()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.ep && is_expert(&self.path) {
            return;
        }
        let trainable = self.lazy.is_trainable(param);
        let name = unit_name(&self.path, trainable);
        let next = self.units.len();
        let i = *self.index.entry(name.clone()).or_insert(next);
        if i == next {
            self.units.push((name, 0, trainable));
        }
        self.units[i].1 += param.lazy_shape().num_elements();
    }
}

/// Records placements (by module path) and cuts FSDP shards.
struct PlanMapper<'a> {
    sharding: Sharding,
    ep: bool,
    size: usize,
    rank: usize,
    path: ModulePath,
    placements: HashMap<ParamId, ParamPlacement>,
    units: &'a [FlatUnit],
    unit_index: HashMap<String, usize>,
    /// Elements of each unit placed so far (the next member's offset).
    filled: Vec<usize>,
    /// Where lazy parameters are told which piece to read.
    lazy: &'a LazyWeights,
}

impl<B: AutodiffBackend> ModuleMapper<B> for PlanMapper<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.to_owned(), container_type.to_owned()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let expert = is_expert(&self.path);
        // The shape without reading a lazy parameter: its piece is requested below, before the value
        // is taken (and a lazy piece comes with the parameter's trainability).
        let dims = param.lazy_shape().to_vec();
        let placement = if expert && self.ep {
            ParamPlacement::Expert
        } else {
            match self.sharding {
                Sharding::Fsdp2 => ParamPlacement::Sharded { dims },
                Sharding::Fsdp1 => {
                    // FSDP1 units split by trainability, which must be known before the read.
                    let unit = self.unit_index[&unit_name(&self.path, self.lazy.is_trainable(&param))];
                    let numel: usize = dims.iter().product();
                    let offset = self.filled[unit];
                    self.filled[unit] += numel;
                    // This rank's chunk of the unit buffer, in the parameter's own coordinates.
                    let chunk = self.units[unit].chunk;
                    let (lo, hi) = (self.rank * chunk, (self.rank + 1) * chunk);
                    let start = lo.clamp(offset, offset + numel) - offset;
                    let end = hi.clamp(offset, offset + numel) - offset;
                    ParamPlacement::Flat { unit, dims, offset, piece: start..end }
                }
                Sharding::Ddp | Sharding::None => ParamPlacement::Replicated,
            }
        };
        let lazy = !param.is_initialized() && self.lazy.contains(param.id);
        // This rank's piece: FSDP2 rows (a contiguous run of the row-major elements) or an FSDP1
        // range of the flattened tensor, and the shape it is stored in.
        let piece = match &placement {
            ParamPlacement::Sharded { dims } => {
                let rows = shard_range(dims[0], self.size, self.rank);
                let row: usize = dims[1..].iter().product();
                let mut shape = dims.clone();
                shape[0] = rows.len();
                Some((rows.start * row..rows.end * row, shape))
            }
            ParamPlacement::Flat { piece, .. } => Some((piece.clone(), piece_dims::<D>(piece.len()).to_vec())),
            _ => None,
        };
        if let (true, Some((elements, shape))) = (lazy, &piece) {
            self.lazy.request_piece(param.id, elements.clone(), shape.clone());
        }
        let (id, tensor, mapper) = param.consume();
        let tensor = match (lazy, piece) {
            // Read as the piece: a fresh tensor of its own, with the parameter's trainability.
            (true, _) | (false, None) => tensor,
            (false, Some((elements, shape))) => {
                let trainable = tensor.is_require_grad();
                let flat: Tensor<B, 1> = tensor.detach().flatten(0, D - 1);
                // Nothing of this parameter on this rank: an empty tensor, made without a kernel
                // (CUDA rejects a launch over nothing, and an unaligned empty slice is a copy).
                let piece = if elements.is_empty() {
                    Tensor::empty(Shape::from(shape), (&flat.device(), flat.dtype()))
                } else {
                    burn_moe_backend::dist::owned_copy(flat.slice([elements])).reshape(Shape::from(shape))
                };
                piece.set_require_grad(trainable)
            }
        };
        self.placements.insert(id, placement);
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The dtype sharded parameters are gathered in: the compute dtype, else f32. The same on every rank,
/// whatever the stored dtype of a shard (frozen LoRA bases are stored in the compute dtype).
fn wire_dtype(compute: Option<FloatDType>) -> FloatDType {
    compute.unwrap_or(FloatDType::F32)
}

/// `[n, 1, …]`: the shape a flat piece of `n` elements is stored in, in a rank-`D` parameter.
fn piece_dims<const D: usize>(n: usize) -> [usize; D] {
    let mut shape = [1usize; D];
    shape[0] = n;
    shape
}

/// `[n]` → `[n, 1, …]` ([`piece_dims`]).
fn piece_shape<B: burn::tensor::backend::Backend, const D: usize>(flat: Tensor<B, 1>) -> Tensor<B, D> {
    let n = flat.dims()[0];
    flat.reshape(piece_dims::<D>(n))
}

/// Concatenates 1-d parts (of dtype `dtype`) and pads with zeros to `len` elements.
fn pad_to<B: burn::tensor::backend::Backend>(parts: Vec<Tensor<B, 1>>, len: usize, device: &B::Device, dtype: FloatDType) -> Tensor<B, 1> {
    let mut parts: Vec<Tensor<B, 1>> = parts.into_iter().filter(|p| p.dims()[0] > 0).collect();
    let have: usize = parts.iter().map(|p| p.dims()[0]).sum();
    if have < len {
        parts.push(Tensor::zeros([len - have], (device, DType::from(dtype))));
    }
    Tensor::cat(parts, 0)
}

/// This rank's pieces of one FSDP1 unit, in member order (inner tensors).
struct CollectPieces<'a, B: burn::tensor::backend::Backend> {
    placements: &'a HashMap<ParamId, ParamPlacement>,
    unit: usize,
    pieces: Vec<Tensor<B, 1>>,
    /// The dtype the pieces are gathered in.
    wire: FloatDType,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectPieces<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(ParamPlacement::Flat { unit, piece, .. }) = self.placements.get(&param.id)
            && *unit == self.unit
        {
            self.pieces.push(crate::precision::cast(param.val().inner().reshape([piece.len()]), self.wire));
        }
    }
}

/// Turns gathered shards into fresh leaves: FSDP2 parameters cut out of their padded all-gathers
/// ([`StartShards`]), FSDP1 members out of their gathered unit buffers.
struct Gather<'a, B: burn::tensor::backend::Backend> {
    placements: &'a HashMap<ParamId, ParamPlacement>,
    /// Gathered FSDP1 unit buffers.
    flats: Vec<Tensor<B, 1>>,
    /// Gathered FSDP2 parameters, padded ([`StartShards`]).
    padded: HashMap<ParamId, Box<dyn std::any::Any>>,
    /// Mixed precision: shards are gathered in this dtype and unsharded parameters become leaves
    /// in it too.
    compute: Option<FloatDType>,
    /// Leave frozen parameters as they are.
    skip_frozen: bool,
    /// `false`: every parameter comes out untracked (a forward pass that keeps no graph).
    track: bool,
    /// The optimizer's compute copies of the unsharded parameters, where it keeps them.
    copies: Option<&'a ComputeCopies<B>>,
    error: Option<ShardingError>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Gather<'_, B::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() || (self.skip_frozen && !param.is_require_grad()) {
            return param;
        }
        let (dims, flat) = match self.placements.get(&param.id) {
            Some(ParamPlacement::Sharded { dims }) => (dims, None),
            Some(ParamPlacement::Flat { unit, dims, offset, .. }) => (dims, Some((*unit, *offset))),
            _ => {
                let (id, t, mapper) = param.consume();
                let t = match (self.compute, self.track) {
                    (None, true) => t,
                    (None, false) => Tensor::from_inner(t.inner()),
                    (Some(c), track) => crate::precision::compute_value(id, t, c, self.copies, track),
                };
                return Param::from_mapped_value(id, t, mapper);
            }
        };
        let (id, shard, mapper) = param.consume();
        let trainable = shard.is_require_grad();
        let dims: [usize; D] = dims.as_slice().try_into().expect("placement recorded with the parameter's rank");
        let gathered = match flat {
            Some((unit, offset)) => {
                let numel: usize = dims.iter().product();
                Ok(self.flats[unit].clone().slice([offset..offset + numel]).reshape(dims))
            }
            None => match self.padded.remove(&id).map(|p| p.downcast::<(DTensor<B::InnerBackend, D>, Tensor<B::InnerBackend, D>)>()) {
                Some(Ok(p)) => Ok(p.0.unpad(p.1)),
                // `StartShards` visits the same parameters with the same placements, so every
                // sharded one has its gather.
                _ => Err(ShardingError::Unsupported(format!("parameter {id} of shape {dims:?} was not gathered"))),
            },
        };
        match gathered {
            Ok(full) => {
                let full = Tensor::<B, D>::from_inner(full);
                let full = if trainable && self.track { full.require_grad() } else { full };
                Param::from_mapped_value(id, full, mapper)
            }
            Err(e) => {
                self.error = Some(e.into());
                Param::from_mapped_value(id, shard, mapper)
            }
        }
    }
}

/// A unit whose sharded parameters are being gathered ([`Parallel::prefetch_part`]), turned into
/// the unit by [`Parallel::wait_part`].
pub struct Gathering<B: AutodiffBackend, M> {
    part: M,
    track: bool,
    compute: Option<FloatDType>,
    skip_frozen: bool,
    /// The outputs of its all-gathers as the collectives wrote them; `None`: not gathered yet.
    queued: Option<Queued<B>>,
}

/// The outputs of one unit's all-gathers.
struct Queued<B: AutodiffBackend> {
    /// FSDP1: each touched unit's flat buffer (empty for the others).
    flats: Vec<Tensor<B::InnerBackend, 1>>,
    /// FSDP2: each sharded parameter's `(DTensor, padded gather)`, `Tensor<B::InnerBackend, D>`.
    padded: HashMap<ParamId, Box<dyn std::any::Any>>,
}

/// All-gathers every FSDP2 shard of a part, padded ([`DTensor::full_tensor_padded`]): the first
/// half of [`Gather`].
struct StartShards<'a, C, B: burn::tensor::backend::Backend> {
    placements: &'a HashMap<ParamId, ParamPlacement>,
    world: &'a C,
    wire: FloatDType,
    skip_frozen: bool,
    padded: HashMap<ParamId, Box<dyn std::any::Any>>,
    error: Option<ShardingError>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend, C: Communicator<B::InnerBackend>> ModuleVisitor<B> for StartShards<'_, C, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() || (self.skip_frozen && !param.is_require_grad()) {
            return;
        }
        let Some(ParamPlacement::Sharded { dims }) = self.placements.get(&param.id) else { return };
        let dims: [usize; D] = dims.as_slice().try_into().expect("placement recorded with the parameter's rank");
        let shard = crate::precision::cast(param.val().inner(), self.wire);
        let started = DTensor::from_local(shard, dims, &[self.world], &[Placement::Shard(0)])
            .and_then(|d| d.full_tensor_padded(&[self.world]).map(|padded| (d, padded)));
        match started {
            Ok(pair) => {
                self.padded.insert(param.id, Box::new(pair));
            }
            Err(e) => self.error = Some(e.into()),
        }
    }
}

/// Reads each parameter whole for [`Parallel::save_consolidated`]: FSDP2 shards all-gathered over the
/// FSDP group, experts over the EP group, FSDP1 members cut from their unit (gathered once per run of
/// the unit's members, f32), replicated parameters as they are. A failed collective is kept for
/// [`take_error`](FetchTensor::take_error) and zeros are returned (every rank then fails the save).
struct GatherFetch<'a, B, C>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend>,
{
    parallel: &'a Parallel<B, C>,
    model: &'a MixtralForCausalLM<B>,
    /// Adapters to fold into base weights, by the base weight's id.
    folds: HashMap<ParamId, Fold<'a, B>>,
    /// The last gathered FSDP1 unit.
    unit: Option<(usize, Tensor<B::InnerBackend, 1>)>,
    error: Option<String>,
}

impl<B, C> GatherFetch<'_, B, C>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend> + 'static,
{
    fn gathered<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) -> Result<Tensor<B::InnerBackend, D>, ShardingError> {
        let p = self.parallel;
        let world = p.mesh.fsdp_group();
        let local = crate::precision::cast(param.val().inner(), FloatDType::F32);
        match p.placements.get(&param.id) {
            Some(ParamPlacement::Sharded { dims }) => {
                let dims: [usize; D] = dims.as_slice().try_into().expect("placement recorded with the parameter's rank");
                Ok(DTensor::from_local(local, dims, &[world], &[Placement::Shard(0)]).and_then(|d| d.full_tensor(&[world]))?)
            }
            Some(ParamPlacement::Expert) => Ok(p.mesh.ep().all_gather(local, 0)?),
            Some(ParamPlacement::Flat { unit, dims, offset, .. }) => {
                let (unit, offset) = (*unit, *offset);
                let dims: [usize; D] = dims.as_slice().try_into().expect("placement recorded with the parameter's rank");
                if self.unit.as_ref().map(|(u, _)| *u) != Some(unit) {
                    // Every rank asks for the same parameters in the same order, so every rank
                    // gathers the same unit here.
                    let chunk = p.unit_chunk(self.model, unit, FloatDType::F32);
                    self.unit = None; // the previous unit's buffer goes before the next is gathered
                    self.unit = Some((unit, world.all_gather(chunk, 0)?));
                }
                let numel: usize = dims.iter().product();
                let (_, flat) = self.unit.as_ref().expect("gathered above");
                Ok(flat.clone().slice([offset..offset + numel]).reshape(dims))
            }
            Some(ParamPlacement::Replicated) | None => Ok(local),
        }
    }

    /// [`gathered`](Self::gathered) plus the folded adapter, if `param` has one.
    fn merged<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) -> Result<Tensor<B::InnerBackend, D>, ShardingError> {
        let full = self.gathered(param)?;
        let delta = match self.folds.get(&param.id) {
            None => return Ok(full),
            Some(Fold::Linear(l)) => l.delta_weight().inner().reshape(full.dims()),
            Some(Fold::Expert(l)) => l.delta_weight().inner().reshape(full.dims()),
        };
        Ok(full + crate::precision::cast(delta, FloatDType::F32))
    }
}

/// A LoRA adapter to fold into the weight it adapts.
enum Fold<'a, B: burn::tensor::backend::Backend> {
    Linear(&'a mixtral_burn::model::LinearLora<B>),
    Expert(&'a burn_moe_backend::ExpertLora<B>),
}

/// The adapters of `model` keyed by the id of the base weight each adapts (the same ids as in the
/// sharded model: consolidation keeps them).
fn folds_of<B: burn::tensor::backend::Backend>(model: &MixtralForCausalLM<B>) -> HashMap<ParamId, Fold<'_, B>> {
    let mut folds = HashMap::new();
    for layer in &model.model.layers {
        let a = &layer.self_attn;
        for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
            if let Some(l) = &lin.lora {
                folds.insert(lin.weight.id, Fold::Linear(l));
            }
        }
        if let Some(l) = &layer.mlp.lora {
            let m = &layer.mlp;
            folds.insert(m.w1.id, Fold::Expert(&l.w1));
            folds.insert(m.w3.id, Fold::Expert(&l.w3));
            folds.insert(m.w2.id, Fold::Expert(&l.w2));
        }
    }
    folds
}

impl<B, C> mixtral_burn::checkpoint::FetchTensor<B> for GatherFetch<'_, B, C>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend> + 'static,
{
    fn fetch<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) -> Vec<f32> {
        match self.merged(param) {
            Ok(full) => full.into_data().convert::<f32>().to_vec().expect("f32 after convert"),
            Err(e) => {
                self.error.get_or_insert_with(|| e.to_string());
                vec![0.0; self.dims(param).iter().product()]
            }
        }
    }

    fn dims<const D: usize>(&self, param: &Param<Tensor<B, D>>) -> Vec<usize> {
        match self.parallel.placements.get(&param.id) {
            Some(ParamPlacement::Sharded { dims } | ParamPlacement::Flat { dims, .. }) => dims.clone(),
            Some(ParamPlacement::Expert) => {
                let mut dims = param.dims().to_vec();
                dims[0] = self.parallel.num_experts;
                dims
            }
            Some(ParamPlacement::Replicated) | None => param.dims().to_vec(),
        }
    }

    fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }
}

/// All-gathers each expert parameter over the EP group (experts are contiguous per EP rank).
struct GatherExperts<'a, C> {
    placements: &'a HashMap<ParamId, ParamPlacement>,
    ep: &'a C,
    /// Leave frozen parameters as they are.
    skip_frozen: bool,
    error: Option<ShardingError>,
}

impl<B: AutodiffBackend, C: Communicator<B::InnerBackend>> ModuleMapper<B> for GatherExperts<'_, C> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.placements.get(&param.id) != Some(&ParamPlacement::Expert)
            || self.error.is_some()
            || (self.skip_frozen && !param.is_require_grad())
        {
            return param;
        }
        let (id, local, mapper) = param.consume();
        match self.ep.all_gather(local.clone().inner(), 0) {
            Ok(full) => Param::from_mapped_value(id, Tensor::from_inner(full), mapper),
            Err(e) => {
                self.error = Some(e.into());
                Param::from_mapped_value(id, local, mapper)
            }
        }
    }
}

struct SyncGrads<'a, C, B: burn::tensor::backend::Backend> {
    placements: &'a HashMap<ParamId, ParamPlacement>,
    world: &'a C,
    expert_dp: &'a C,
    grads: &'a mut GradientsParams,
    /// FSDP1: each unit's full gradients, flattened, in member order.
    flat: Vec<Vec<Tensor<B, 1>>>,
    /// Leave sharded (FSDP2 and FSDP1) gradients alone: already reduced.
    skip_sharded: bool,
    error: Option<ShardingError>,
}

impl<B: AutodiffBackend, C: Communicator<B::InnerBackend>> ModuleVisitor<B> for SyncGrads<'_, C, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() || !param.is_require_grad() {
            return;
        }
        let id = param.id;
        let placement = self.placements.get(&id).cloned().unwrap_or(ParamPlacement::Replicated);
        if self.skip_sharded && matches!(placement, ParamPlacement::Sharded { .. } | ParamPlacement::Flat { .. }) {
            return;
        }
        let device = param.val().device();
        let zeros = |dims: Vec<usize>| Tensor::<B::InnerBackend, D>::zeros(dims, &device);
        let result = match placement {
            ParamPlacement::Flat { unit, dims, .. } => {
                let full = self.grads.remove::<B::InnerBackend, D>(id).unwrap_or_else(|| zeros(dims));
                self.flat[unit].push(full.flatten(0, D - 1));
                return;
            }
            ParamPlacement::Sharded { dims } => {
                let full = self.grads.remove::<B::InnerBackend, D>(id).unwrap_or_else(|| zeros(dims));
                reduce_scatter_shard(self.world, full, 0, ReduceOp::Sum).map_err(ShardingError::from)
            }
            ParamPlacement::Replicated | ParamPlacement::Expert => {
                let group = if placement == ParamPlacement::Expert { self.expert_dp } else { self.world };
                let missing = self.grads.get::<B::InnerBackend, D>(id).is_none();
                if group.size() == 1 && !(missing && placement == ParamPlacement::Expert) {
                    return;
                }
                // Experts without tokens on this rank get a zero gradient, not none: on one device
                // they are rows of a stacked tensor that always has one, so AdamW still applies its
                // moments and weight decay to them.
                let local = self.grads.remove::<B::InnerBackend, D>(id).unwrap_or_else(|| zeros(param.val().dims().to_vec()));
                if group.size() == 1 {
                    Ok(local)
                } else {
                    group.all_reduce(local, ReduceOp::Sum).map_err(ShardingError::from)
                }
            }
        };
        match result {
            Ok(g) => self.grads.register::<B::InnerBackend, D>(id, g),
            Err(e) => self.error = Some(e),
        }
    }
}

struct SumSquares<'a, B: burn::tensor::backend::Backend> {
    grads: &'a GradientsParams,
    placements: &'a HashMap<ParamId, ParamPlacement>,
    world_size: f64,
    dp: f64,
    total: Option<Tensor<B, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumSquares<'_, B::InnerBackend>
where
    B::InnerBackend: MoeBackend,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) else { return };
        // Each element of the global model counted once over all ranks.
        let weight = match self.placements.get(&param.id) {
            Some(ParamPlacement::Sharded { .. } | ParamPlacement::Flat { .. }) => 1.0,
            Some(ParamPlacement::Expert) => 1.0 / self.dp,
            _ => 1.0 / self.world_size,
        };
        let sq = burn_moe_backend::ops::moe_sum_squares(g).mul_scalar(weight);
        self.total = Some(match self.total.take() {
            Some(t) => t + sq,
            None => sq,
        });
    }
}

/// Adds each FSDP1 piece's gradient, cut from its unit's reduce-scattered chunk, to `grads`.
struct RegisterPieces<'a, B: burn::tensor::backend::Backend> {
    placements: &'a HashMap<ParamId, ParamPlacement>,
    units: &'a [FlatUnit],
    chunks: Vec<Option<Tensor<B, 1>>>,
    rank: usize,
    grads: &'a mut GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for RegisterPieces<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(ParamPlacement::Flat { unit, offset, piece, .. }) = self.placements.get(&param.id) else { return };
        let Some(chunk) = &self.chunks[*unit] else { return };
        if piece.is_empty() {
            // Nothing of this parameter on this rank: nothing to update here.
            return;
        }
        // The piece's place inside this rank's chunk of the unit buffer.
        let start = offset + piece.start - self.rank * self.units[*unit].chunk;
        let grad = chunk.clone().slice([start..start + piece.len()]);
        accumulate::<B::InnerBackend, D>(self.grads, param.id, piece_shape(grad));
    }
}

/// `grads[id] += g` (registers `g` when there is none yet).
fn accumulate<B: burn::tensor::backend::Backend, const D: usize>(grads: &mut GradientsParams, id: ParamId, g: Tensor<B, D>) {
    let g = match grads.remove::<B, D>(id) {
        Some(acc) => acc + g,
        None => g,
    };
    grads.register::<B, D>(id, g);
}

/// The FSDP1 units with members in a module.
struct UnitsOf<'a> {
    placements: &'a HashMap<ParamId, ParamPlacement>,
    units: std::collections::BTreeSet<usize>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for UnitsOf<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(ParamPlacement::Flat { unit, .. }) = self.placements.get(&param.id) {
            self.units.insert(*unit);
        }
    }
}

/// Reduces the gradients of the per-layer schedule part by part, within one micro-batch: FSDP2
/// shards are reduce-scattered as soon as their part's backward pass has run (so no more than one
/// part's full gradients exist at a time), FSDP1 units once every member has been through its
/// part (a layer's units at once; the root unit, whose members are the head and the embedding,
/// after the embedding). Replicated and expert gradients are passed on unreduced:
/// [`Parallel::sync_grads`] reduces them once per step. Every rank must add the same parts in the
/// same order (the collectives follow it).
///
/// Under `--fsdp-gather prefetch` the reduce-scatters are deferred
/// ([`Communicator::defer_reductions`]): a part's reductions run on NCCL while the next part's
/// backward pass computes, and land in the gradients at the next [`add`](Self::add) or at
/// [`finish`](Self::finish), which must end the micro-batch. At most one part's reductions are in
/// flight, so at most two parts' full gradients exist at a time.
pub struct PartReducer<'a, B, C>
where
    B: AutodiffBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend>,
{
    parallel: &'a Parallel<B, C>,
    /// FSDP1: members of each unit not yet through a part.
    left: Vec<usize>,
    /// FSDP1: full gradients of members whose unit is not complete yet.
    pending: GradientsParams,
    /// The reductions are deferred.
    defer: bool,
    /// Reductions whose outputs are not yet in the gradients (deferred ones until their wait).
    landing: Vec<Landing<'a, B::InnerBackend>>,
}

/// A reduction's output, to be put in the gradients once the reductions are waited for.
enum Landing<'a, B: burn::tensor::backend::Backend> {
    /// An FSDP2 shard: trims its padding and accumulates itself.
    Shard(Box<dyn FnOnce(&mut GradientsParams) + 'a>),
    /// FSDP1 unit `.0`'s chunk.
    Unit(usize, Tensor<B, 1>),
}

impl<'a, B, C> PartReducer<'a, B, C>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = B::InnerBackend>,
    C: Communicator<B::InnerBackend> + 'static,
{
    /// A reducer for one micro-batch.
    pub fn new(parallel: &'a Parallel<B, C>) -> Self {
        let mut left = vec![0; parallel.units.len()];
        for p in parallel.placements.values() {
            if let ParamPlacement::Flat { unit, .. } = p {
                left[*unit] += 1;
            }
        }
        let defer = parallel.gather == FsdpGather::Prefetch;
        Self { parallel, left, pending: GradientsParams::new(), defer, landing: Vec::new() }
    }

    /// Waits for the reductions (when deferred) and puts their outputs in `into`.
    fn flush(&mut self, model: &MixtralForCausalLM<B>, into: &mut GradientsParams) -> Result<(), ShardingError> {
        if self.landing.is_empty() {
            return Ok(());
        }
        let p = self.parallel;
        if self.defer {
            p.mesh.fsdp_group().wait_reductions()?;
        }
        for landing in std::mem::take(&mut self.landing) {
            match landing {
                Landing::Shard(land) => land(into),
                Landing::Unit(unit, chunk) => {
                    let mut chunks = vec![None; p.units.len()];
                    chunks[unit] = Some(chunk);
                    model.visit(&mut RegisterPieces { placements: &p.placements, units: &p.units, chunks, rank: p.mesh.fsdp_group().rank(), grads: &mut *into });
                }
            }
        }
        Ok(())
    }

    /// Ends the micro-batch: every reduction is in `into`. Collective only in that it waits for
    /// this rank's deferred reductions.
    ///
    /// # Errors
    /// A failed reduce-scatter.
    pub fn finish(mut self, model: &MixtralForCausalLM<B>, into: &mut GradientsParams) -> Result<(), ShardingError> {
        self.flush(model, into)
    }

    /// Takes the gradients `grads` of one part's backward pass (full tensors of the gathered
    /// parameters, f32) and adds this rank's reduced shards, and the unreduced replicated and
    /// expert gradients, to `into`. Collective over the FSDP group.
    ///
    /// # Errors
    /// A failed reduce-scatter.
    pub fn add<M: Module<B>>(
        &mut self,
        model: &MixtralForCausalLM<B>,
        part: &M,
        mut grads: GradientsParams,
        into: &mut GradientsParams,
    ) -> Result<(), ShardingError> {
        // The previous part's reductions have had this part's backward pass to run.
        self.flush(model, into)?;
        let world = self.parallel.mesh.fsdp_group();
        world.defer_reductions(self.defer);
        let queued = self.queue(model, part, &mut grads, into);
        world.defer_reductions(false);
        queued?;
        if !self.defer {
            self.flush(model, into)?;
        }
        Ok(())
    }

    /// The reductions of [`add`](Self::add): FSDP2 shards of `part`'s gradients and the FSDP1 units
    /// it completes go to `landing`; replicated and expert gradients to `into` as they are.
    fn queue<M: Module<B>>(
        &mut self,
        model: &MixtralForCausalLM<B>,
        part: &M,
        grads: &mut GradientsParams,
        into: &mut GradientsParams,
    ) -> Result<(), ShardingError> {
        let p = self.parallel;
        let world = p.mesh.fsdp_group();
        let mut visit = ReducePart {
            placements: &p.placements,
            world,
            grads,
            into,
            pending: &mut self.pending,
            left: &mut self.left,
            landing: &mut self.landing,
            complete: Vec::new(),
            error: None,
        };
        part.visit(&mut visit);
        let (complete, error) = (visit.complete, visit.error);
        if let Some(e) = error {
            return Err(e);
        }
        let device = model.lm_head.weight.val().device();
        for unit in complete {
            if !p.units[unit].trainable {
                continue;
            }
            let mut members = UnitGrads { placements: &p.placements, unit, pending: &mut self.pending, device: &device, parts: Vec::new() };
            model.visit(&mut members);
            let full = pad_to(members.parts, p.units[unit].chunk * world.size(), &device, FloatDType::F32);
            self.landing.push(Landing::Unit(unit, world.reduce_scatter(full, 0, ReduceOp::Sum)?));
        }
        Ok(())
    }
}

/// One part's gradients through [`PartReducer::add`].
struct ReducePart<'a, 'w, C, B: burn::tensor::backend::Backend> {
    placements: &'a HashMap<ParamId, ParamPlacement>,
    world: &'w C,
    grads: &'a mut GradientsParams,
    into: &'a mut GradientsParams,
    pending: &'a mut GradientsParams,
    left: &'a mut [usize],
    /// Where the reductions' outputs wait for [`PartReducer::flush`].
    landing: &'a mut Vec<Landing<'w, B>>,
    /// FSDP1 units whose last member this part held.
    complete: Vec<usize>,
    error: Option<ShardingError>,
}

impl<'w, B: AutodiffBackend, C: Communicator<B::InnerBackend>> ModuleVisitor<B> for ReducePart<'_, 'w, C, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let id = param.id;
        match self.placements.get(&id) {
            Some(ParamPlacement::Flat { unit, .. }) => {
                if let Some(g) = self.grads.remove::<B::InnerBackend, D>(id) {
                    self.pending.register::<B::InnerBackend, D>(id, g);
                }
                self.left[*unit] -= 1;
                if self.left[*unit] == 0 {
                    self.complete.push(*unit);
                }
            }
            Some(ParamPlacement::Sharded { dims }) => {
                if self.error.is_some() || !param.is_require_grad() {
                    return;
                }
                // A trainable parameter without a gradient counts as zero: every rank joins the same
                // reduce-scatters.
                let full = self.grads.remove::<B::InnerBackend, D>(id).unwrap_or_else(|| Tensor::zeros(dims.clone(), &param.val().device()));
                // The output as the collective wrote it: trimmed only once complete.
                let (world, len) = (self.world, dims[0]);
                match reduce_scatter_shard_padded(world, full, 0, ReduceOp::Sum) {
                    Ok(part) => self.landing.push(Landing::Shard(Box::new(move |into: &mut GradientsParams| {
                        accumulate::<B::InnerBackend, D>(into, id, trim_reduced_shard(world, part, 0, len));
                    }))),
                    Err(e) => self.error = Some(e.into()),
                }
            }
            _ => {
                if let Some(g) = self.grads.remove::<B::InnerBackend, D>(id) {
                    accumulate::<B::InnerBackend, D>(self.into, id, g);
                }
            }
        }
    }
}

/// The full gradients of one FSDP1 unit's members, flattened in member order (zeros for a member
/// without one).
struct UnitGrads<'a, B: burn::tensor::backend::Backend> {
    placements: &'a HashMap<ParamId, ParamPlacement>,
    unit: usize,
    pending: &'a mut GradientsParams,
    device: &'a B::Device,
    parts: Vec<Tensor<B, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for UnitGrads<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(ParamPlacement::Flat { unit, dims, .. }) = self.placements.get(&param.id) else { return };
        if *unit != self.unit {
            return;
        }
        let full = self.pending.remove::<B::InnerBackend, D>(param.id).unwrap_or_else(|| Tensor::zeros(dims.clone(), self.device));
        self.parts.push(full.flatten(0, D - 1));
    }
}

/// The factor `clip_grad_norm_` scales the gradients by: `max / (norm + 1e-6)` when the norm
/// exceeds `max`, else 1 (also without clipping).
pub fn clip_factor(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if norm > max => max / (norm + 1e-6),
        _ => 1.0,
    }
}

#[cfg(test)]
mod clip_tests {
    use super::clip_factor;

    #[test]
    fn clip_factor_scales_only_above_the_maximum() {
        assert_eq!(clip_factor(0.5, Some(1.0)), 1.0);
        assert_eq!(clip_factor(4.0, None), 1.0);
        let f = clip_factor(4.0, Some(1.0));
        assert!((f - 1.0 / (4.0 + 1e-6)).abs() < 1e-15, "{f}");
    }
}
