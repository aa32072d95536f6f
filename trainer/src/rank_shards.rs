//! Per-rank weight shards of sharded checkpoints (FSDP1, FSDP2, EP), so that saving and resuming
//! never need the whole model on one rank.
//!
//! In `checkpoint-<step>/`:
//! - `ranks/rank<r>/model_shard.safetensors`: the parameter data rank `r` owns, as stored on the
//!   rank (its dtype; FSDP1 pieces as 1-d tensors). A rank owns its FSDP2 rows, its FSDP1 flat
//!   pieces and its experts; a tensor held whole by several ranks (replicated parameters of an EP
//!   run with `--sharding ddp`, experts replicated over the expert-data-parallel group) is written
//!   only by the first rank of its replica group. Empty pieces (an uneven last shard, an FSDP1
//!   unit boundary) are not written.
//! - `ranks/rank<r>/shard_index.json`: [`RankShardIndex`], the tensors of that file.
//! - `shards.json`: [`ShardsIndex`], merged by rank 0 from the ranks' indexes: for every parameter
//!   its global `shape`, `dtype` and `pieces`, each `{rank, file, kind, ...}` with
//!   `kind: "block"` (`offsets` and `lengths` per dimension of the global tensor: FSDP2 rows,
//!   uneven last shards, expert ranges, whole replicated tensors) or `kind: "flat"` (`offset` and
//!   `length` in the row-major flattening of the global tensor: FSDP1 pieces, which may start and
//!   end inside a row). The pieces of a parameter cover its global tensor exactly once, so a reader
//!   reassembles any tensor from this file and the safetensors files alone.
//!
//! Tensor names are the HF names where one exists (embedding, attention, norms, router
//! `...block_sparse_moe.gate.weight`, LM head), else the module path: the stacked experts
//! `model.layers.{l}.mlp.w1` (`[E, F, D]`; `w3` alike, `w2` `[E, D, F]`) and the LoRA adapters
//! (`...q_proj.lora.a`, `...mlp.lora.w1.a`). Stacked experts list `hf_names`, the HF classic name of
//! each index along dimension 0 (`...block_sparse_moe.experts.{e}.w1.weight`).
//!
//! Resuming from the shards ([`load_rank_shards`]) needs the plan and world size that wrote them;
//! each rank then reads its own pieces (and the replicated tensors it does not own from the
//! owner's file), checking every listed file first so that all ranks fail alike on a missing or
//! corrupt one.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointError, rank_staging_dir};
use crate::sharding::LocalPiece;

/// A rank's weight shard inside `ranks/rank<r>/`.
pub const MODEL_SHARD_FILE: &str = "model_shard.safetensors";
/// A rank's shard index inside `ranks/rank<r>/`.
pub const SHARD_INDEX_FILE: &str = "shard_index.json";
/// The merged index at the top of a checkpoint.
pub const SHARDS_FILE: &str = "shards.json";
/// `format` of the indexes.
pub const SHARDS_FORMAT: &str = "burn-moe-rank-shards/1";

/// Which elements of a parameter's global tensor a piece holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Region {
    /// The block `offsets[d]..offsets[d] + lengths[d]` of every dimension `d`; stored with shape
    /// `lengths`.
    Block {
        /// First index per dimension.
        offsets: Vec<usize>,
        /// Extent per dimension.
        lengths: Vec<usize>,
    },
    /// Elements `offset..offset + length` of the row-major flattened tensor; stored as `[length]`.
    Flat {
        /// First element.
        offset: usize,
        /// Elements.
        length: usize,
    },
}

impl Region {
    /// Elements of the piece.
    #[must_use]
    pub fn numel(&self) -> usize {
        match self {
            Region::Block { lengths, .. } => lengths.iter().product(),
            Region::Flat { length, .. } => *length,
        }
    }

    /// Shape of the piece in its safetensors file.
    #[must_use]
    pub fn stored_shape(&self) -> Vec<usize> {
        match self {
            Region::Block { lengths, .. } => lengths.clone(),
            Region::Flat { length, .. } => vec![*length],
        }
    }
}

/// One tensor of a rank's shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankTensor {
    /// Name in the file and in [`ShardsIndex`].
    pub name: String,
    /// Global shape of the parameter.
    pub shape: Vec<usize>,
    /// safetensors dtype (`F32`, `BF16`, `F16`).
    pub dtype: String,
    /// The part of the global tensor this rank stores.
    #[serde(flatten)]
    pub region: Region,
    /// Stacked experts: the HF name of each index along dimension 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_names: Option<Vec<String>>,
}

/// `ranks/rank<r>/shard_index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankShardIndex {
    /// [`SHARDS_FORMAT`].
    pub format: String,
    /// The parallel plan (`fsdp2`, `fsdp1+ep2(dp1)`, ...).
    pub plan: String,
    /// Ranks of the run.
    pub world_size: usize,
    /// This rank.
    pub rank: usize,
    /// The shard file, relative to the checkpoint directory.
    pub file: String,
    /// Its tensors.
    pub tensors: Vec<RankTensor>,
}

/// One stored piece of a parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPiece {
    /// The rank that wrote it.
    pub rank: usize,
    /// Its safetensors file, relative to the checkpoint directory (tensor name: the parameter's).
    pub file: String,
    /// The part of the global tensor.
    #[serde(flatten)]
    pub region: Region,
}

/// One parameter of [`ShardsIndex`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardedParam {
    /// Tensor name (see the module docs).
    pub name: String,
    /// Global shape.
    pub shape: Vec<usize>,
    /// safetensors dtype.
    pub dtype: String,
    /// Stacked experts: the HF name of each index along dimension 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_names: Option<Vec<String>>,
    /// Its pieces, which cover the global tensor exactly once.
    pub pieces: Vec<ShardPiece>,
}

/// `shards.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardsIndex {
    /// [`SHARDS_FORMAT`].
    pub format: String,
    /// The parallel plan.
    pub plan: String,
    /// Ranks of the run.
    pub world_size: usize,
    /// Every parameter, in module order of the ranks that own them.
    pub parameters: Vec<ShardedParam>,
}

/// `(field, parent container type)` of the modules entered by a visitor or mapper.
type ModulePath = Vec<(String, String)>;

/// Tensor name of a parameter at `path` (see the module docs) and, for stacked experts, the HF
/// name of each expert.
fn tensor_name(path: &ModulePath, global_dims: &[usize]) -> (String, Option<Vec<String>>) {
    let names: Vec<&str> = path.iter().map(|(n, _)| n.as_str()).collect();
    let joined = names.join(".");
    let Some(i) = path.iter().position(|(_, container)| container == "Struct:DMoe") else {
        return (joined, None);
    };
    // `path[i]` is the DMoe's field; the DMoe itself (`mlp`) is the element before.
    let prefix = names[..i.saturating_sub(1)].join(".");
    let field = names[i];
    if path.len() != i + 1 {
        // Adapters of the experts.
        return (joined, None);
    }
    match field {
        "gate" => (format!("{prefix}.block_sparse_moe.gate.weight"), None),
        "w1" | "w2" | "w3" => {
            let experts = global_dims.first().copied().unwrap_or(0);
            let hf = (0..experts).map(|e| format!("{prefix}.block_sparse_moe.experts.{e}.{field}.weight")).collect();
            (joined, Some(hf))
        }
        _ => (joined, None),
    }
}

fn dtype_name(dtype: DType) -> Option<Dtype> {
    match dtype {
        DType::F32 => Some(Dtype::F32),
        DType::F64 => Some(Dtype::F64),
        DType::BF16 => Some(Dtype::BF16),
        DType::F16 => Some(Dtype::F16),
        _ => None,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

fn shard_error(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Shard { path: path.to_path_buf(), message: message.into() }
}

/// Collects the pieces this rank owns, with their names.
struct Collect<'a, F> {
    piece: &'a F,
    path: ModulePath,
    out: Vec<(RankTensor, TensorData)>,
    missing: Option<String>,
}

impl<B: Backend, F: Fn(ParamId, &[usize]) -> Option<LocalPiece>> ModuleVisitor<B> for Collect<'_, F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.to_owned(), container_type.to_owned()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let dims = value.dims().to_vec();
        let Some(piece) = (self.piece)(param.id, &dims) else {
            self.missing.get_or_insert_with(|| tensor_name(&self.path, &dims).0);
            return;
        };
        if !piece.owner {
            return;
        }
        let (name, hf_names) = tensor_name(&self.path, &piece.global_dims);
        let data = value.into_data();
        let dtype = dtype_name(data.dtype).map_or_else(|| format!("{:?}", data.dtype), |d| format!("{d:?}"));
        self.out.push((RankTensor { name, shape: piece.global_dims, dtype, region: piece.region, hf_names }, data));
    }
}

/// Writes the weight pieces rank `rank` owns (`piece` says which part of each parameter the rank
/// holds, [`crate::sharding::Parallel::local_piece`]) and their index into the staging directory
/// of `step`, next to the files of [`crate::checkpoint::stage_rank_state`] (call it after that,
/// which clears the rank's staging directory).
///
/// # Errors
/// [`CheckpointError`] naming the file that could not be written.
pub fn stage_rank_shards<B: Backend, M: Module<B>, F: Fn(ParamId, &[usize]) -> Option<LocalPiece>>(
    output_dir: &Path,
    step: usize,
    rank: usize,
    world_size: usize,
    plan: &str,
    model: &M,
    piece: &F,
) -> Result<(), CheckpointError> {
    let dir = rank_staging_dir(output_dir, step).join(format!("rank{rank}"));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join(MODEL_SHARD_FILE);
    let mut collect = Collect { piece, path: Vec::new(), out: Vec::new(), missing: None };
    model.visit(&mut collect);
    if let Some(name) = collect.missing {
        return Err(shard_error(&path, format!("parameter {name} has no place in the {plan} plan")));
    }
    let mut views = Vec::with_capacity(collect.out.len());
    for (t, data) in &collect.out {
        let dtype = dtype_name(data.dtype).ok_or_else(|| shard_error(&path, format!("{}: dtype {:?} cannot be stored", t.name, data.dtype)))?;
        let view = safetensors::tensor::TensorView::new(dtype, t.region.stored_shape(), data.as_bytes())
            .map_err(|e| shard_error(&path, format!("{}: {e}", t.name)))?;
        views.push((t.name.clone(), view));
    }
    safetensors::serialize_to_file(views, None, &path).map_err(|e| shard_error(&path, e.to_string()))?;
    let index = RankShardIndex {
        format: SHARDS_FORMAT.to_owned(),
        plan: plan.to_owned(),
        world_size,
        rank,
        file: format!("ranks/rank{rank}/{MODEL_SHARD_FILE}"),
        tensors: collect.out.into_iter().map(|(t, _)| t).collect(),
    };
    let index_path = dir.join(SHARD_INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).map_err(|source| CheckpointError::State { path: index_path.clone(), source })?;
    std::fs::write(&index_path, text).map_err(io(&index_path))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CheckpointError> {
    if !path.is_file() {
        return Err(CheckpointError::Missing { path: path.to_path_buf() });
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|source| CheckpointError::State { path: path.to_path_buf(), source })
}

/// Merges the staged `rank<r>/shard_index.json` files of `staged` (a run's rank staging directory)
/// into the checkpoint's [`ShardsIndex`]; `None` when the ranks staged no weight shards.
///
/// # Errors
/// [`CheckpointError`] naming a missing or unreadable rank index, or one that disagrees with
/// rank 0's about the plan, the world size or a parameter's shape and dtype.
pub fn merge_rank_indexes(staged: &Path) -> Result<Option<ShardsIndex>, CheckpointError> {
    let first = staged.join("rank0").join(SHARD_INDEX_FILE);
    if !first.is_file() {
        return Ok(None);
    }
    let head: RankShardIndex = read_json(&first)?;
    let mut index =
        ShardsIndex { format: SHARDS_FORMAT.to_owned(), plan: head.plan.clone(), world_size: head.world_size, parameters: Vec::new() };
    let mut position: HashMap<String, usize> = HashMap::new();
    for rank in 0..head.world_size {
        let path = staged.join(format!("rank{rank}")).join(SHARD_INDEX_FILE);
        let ri: RankShardIndex = if rank == 0 { head.clone() } else { read_json(&path)? };
        if (ri.plan.as_str(), ri.world_size, ri.rank) != (head.plan.as_str(), head.world_size, rank) {
            return Err(CheckpointError::Mismatch {
                path,
                message: format!(
                    "rank {} of a {} run on {} ranks, expected rank {rank} of {} on {}",
                    ri.rank, ri.plan, ri.world_size, head.plan, head.world_size
                ),
            });
        }
        for t in ri.tensors {
            let at = *position.entry(t.name.clone()).or_insert_with(|| {
                index.parameters.push(ShardedParam {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    dtype: t.dtype.clone(),
                    hf_names: t.hf_names.clone(),
                    pieces: Vec::new(),
                });
                index.parameters.len() - 1
            });
            let p = &mut index.parameters[at];
            if (&p.shape, &p.dtype) != (&t.shape, &t.dtype) {
                return Err(CheckpointError::Mismatch {
                    path,
                    message: format!("{} is {:?} {} here, {:?} {} on another rank", t.name, t.shape, t.dtype, p.shape, p.dtype),
                });
            }
            p.pieces.push(ShardPiece { rank, file: ri.file.clone(), region: t.region });
        }
    }
    Ok(Some(index))
}

/// Writes `dir/shards.json`.
///
/// # Errors
/// [`CheckpointError::Io`] naming the file.
pub fn write_shards_index(dir: &Path, index: &ShardsIndex) -> Result<(), CheckpointError> {
    let path = dir.join(SHARDS_FILE);
    let text = serde_json::to_string_pretty(index).map_err(|source| CheckpointError::State { path: path.clone(), source })?;
    std::fs::write(&path, text).map_err(io(&path))
}

/// One memory-mapped shard file and its parsed header.
struct MappedShard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl MappedShard {
    fn open(path: PathBuf) -> Result<Self, CheckpointError> {
        if !path.is_file() {
            return Err(CheckpointError::Missing { path });
        }
        let file = File::open(&path).map_err(io(&path))?;
        // SAFETY: the map is read-only; a checkpoint modified while it is read is the user's race,
        // and safetensors checks the header's offsets against the mapped length (a truncated file
        // is an error) before any tensor is read.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
        let (header, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| shard_error(&path, e.to_string()))?;
        let tensors = metadata.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
        Ok(Self { data_start: 8 + header, path, mmap, tensors })
    }

    /// The bytes of `name` after checking its shape and dtype.
    fn bytes(&self, name: &str, shape: &[usize], dtype: &str) -> Result<&[u8], CheckpointError> {
        let info = self.tensors.get(name).ok_or_else(|| shard_error(&self.path, format!("no tensor {name}")))?;
        if info.shape != shape || format!("{:?}", info.dtype) != dtype {
            return Err(shard_error(
                &self.path,
                format!("{name} is {:?} {:?}, shards.json says {shape:?} {dtype}", info.shape, info.dtype),
            ));
        }
        let (start, end) = info.data_offsets;
        Ok(&self.mmap[self.data_start + start..self.data_start + end])
    }
}

/// Replaces every parameter of this rank's sharded `model` by its piece from the checkpoint's
/// per-rank shards (`dir/shards.json`, written by a run with plan `plan` on `world_size` ranks).
/// `piece` gives the part of each parameter the rank holds, as when saving.
///
/// # Errors
/// [`CheckpointError::Missing`] / [`CheckpointError::State`] for an absent or invalid
/// `shards.json`; [`CheckpointError::Mismatch`] when it was written by another plan or world size
/// or lacks a parameter or piece; [`CheckpointError::Missing`] / [`CheckpointError::Shard`] naming
/// a missing or corrupt shard file (every listed file is checked, so all ranks fail alike).
pub fn load_rank_shards<B: Backend, M: Module<B>, F: Fn(ParamId, &[usize]) -> Option<LocalPiece>>(
    dir: &Path,
    model: M,
    rank: usize,
    world_size: usize,
    plan: &str,
    piece: &F,
) -> Result<M, CheckpointError> {
    let index_path = dir.join(SHARDS_FILE);
    let index: ShardsIndex = read_json(&index_path)?;
    if index.format != SHARDS_FORMAT || index.plan != plan || index.world_size != world_size {
        return Err(CheckpointError::Mismatch {
            path: index_path,
            message: format!(
                "shards of format {} written by a {} run on {} ranks, this run is {plan} on {world_size} ranks (format {SHARDS_FORMAT})",
                index.format, index.plan, index.world_size
            ),
        });
    }
    let mut files: HashMap<String, MappedShard> = HashMap::new();
    for p in &index.parameters {
        for pc in &p.pieces {
            if !files.contains_key(&pc.file) {
                if pc.file.contains("..") || Path::new(&pc.file).is_absolute() {
                    return Err(CheckpointError::Mismatch { path: index_path, message: format!("file {} points outside the checkpoint", pc.file) });
                }
                files.insert(pc.file.clone(), MappedShard::open(dir.join(&pc.file))?);
            }
            files[&pc.file].bytes(&p.name, &pc.region.stored_shape(), &p.dtype)?;
        }
    }
    let params: HashMap<&str, &ShardedParam> = index.parameters.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut load = Load { piece, rank, params, files: &files, index_path: &index_path, path: Vec::new(), error: None };
    let model = model.map(&mut load);
    match load.error {
        Some(e) => Err(e),
        None => Ok(model),
    }
}

struct Load<'a, F> {
    piece: &'a F,
    rank: usize,
    params: HashMap<&'a str, &'a ShardedParam>,
    files: &'a HashMap<String, MappedShard>,
    index_path: &'a Path,
    path: ModulePath,
    error: Option<CheckpointError>,
}

impl<F: Fn(ParamId, &[usize]) -> Option<LocalPiece>> Load<'_, F> {
    /// The stored piece of the parameter `id` (local shape `dims`, dtype `dtype`) as tensor data.
    fn data(&self, id: ParamId, dims: &[usize], dtype: DType) -> Result<Option<TensorData>, CheckpointError> {
        let mismatch = |message: String| CheckpointError::Mismatch { path: self.index_path.to_path_buf(), message };
        let Some(piece) = (self.piece)(id, dims) else {
            return Err(mismatch(format!("parameter {} has no place in this run's plan", tensor_name(&self.path, dims).0)));
        };
        if piece.region.numel() == 0 {
            return Ok(None);
        }
        let (name, _) = tensor_name(&self.path, &piece.global_dims);
        let p = self.params.get(name.as_str()).ok_or_else(|| mismatch(format!("no parameter {name}")))?;
        let want = dtype_name(dtype).map_or_else(|| format!("{dtype:?}"), |d| format!("{d:?}"));
        if p.shape != piece.global_dims || p.dtype != want {
            return Err(mismatch(format!("{name} is {:?} {}, this model's is {:?} {want}", p.shape, p.dtype, piece.global_dims)));
        }
        // This rank's own piece, else the identical piece its replica group's owner wrote.
        let stored = p
            .pieces
            .iter()
            .filter(|s| s.region == piece.region)
            .min_by_key(|s| s.rank != self.rank)
            .ok_or_else(|| mismatch(format!("no piece {:?} of {name}", piece.region)))?;
        let bytes = self.files[&stored.file].bytes(&name, &piece.region.stored_shape(), &p.dtype)?;
        Ok(Some(TensorData::from_bytes_vec(bytes.to_vec(), dims.to_vec(), dtype)))
    }
}

impl<B: Backend, F: Fn(ParamId, &[usize]) -> Option<LocalPiece>> ModuleMapper<B> for Load<'_, F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.to_owned(), container_type.to_owned()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims().to_vec();
        match self.data(id, &dims, tensor.dtype()) {
            Ok(Some(data)) => {
                let trainable = tensor.is_require_grad();
                let loaded = Tensor::<B, D>::from_data(data, (&tensor.device(), tensor.dtype())).set_require_grad(trainable);
                Param::from_mapped_value(id, loaded, mapper)
            }
            Ok(None) => Param::from_mapped_value(id, tensor, mapper),
            Err(e) => {
                self.error = Some(e);
                Param::from_mapped_value(id, tensor, mapper)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_hf_where_one_exists() {
        let p = |v: &[(&str, &str)]| v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect::<ModulePath>();
        let layer = [("model", "Struct:MixtralForCausalLM"), ("layers", "Struct:MixtralModel"), ("1", "Vec")];
        let q = p(&[&layer[..], &[("self_attn", "Struct:DecoderLayer"), ("q_proj", "Struct:MixtralAttention"), ("weight", "Struct:HfLinear")]].concat());
        assert_eq!(tensor_name(&q, &[8, 8]), ("model.layers.1.self_attn.q_proj.weight".to_owned(), None));
        let gate = p(&[&layer[..], &[("mlp", "Struct:DecoderLayer"), ("gate", "Struct:DMoe")]].concat());
        assert_eq!(tensor_name(&gate, &[4, 8]).0, "model.layers.1.block_sparse_moe.gate.weight");
        let w2 = p(&[&layer[..], &[("mlp", "Struct:DecoderLayer"), ("w2", "Struct:DMoe")]].concat());
        let (name, hf) = tensor_name(&w2, &[2, 8, 16]);
        assert_eq!(name, "model.layers.1.mlp.w2");
        assert_eq!(
            hf.unwrap(),
            ["model.layers.1.block_sparse_moe.experts.0.w2.weight", "model.layers.1.block_sparse_moe.experts.1.w2.weight"]
        );
        let lora = p(&[&layer[..], &[("mlp", "Struct:DecoderLayer"), ("lora", "Struct:DMoe"), ("w1", "Struct:DMoeLora"), ("a", "Struct:ExpertAdapter")]].concat());
        assert_eq!(tensor_name(&lora, &[4, 2, 8]), ("model.layers.1.mlp.lora.w1.a".to_owned(), None));
    }

    #[test]
    fn region_json_is_flat() {
        let piece = ShardPiece { rank: 1, file: "ranks/rank1/model_shard.safetensors".into(), region: Region::Flat { offset: 5, length: 7 } };
        let json = serde_json::to_value(&piece).unwrap();
        assert_eq!(json, serde_json::json!({"rank": 1, "file": "ranks/rank1/model_shard.safetensors", "kind": "flat", "offset": 5, "length": 7}));
        assert_eq!(serde_json::from_value::<ShardPiece>(json).unwrap(), piece);
        let block = Region::Block { offsets: vec![2, 0], lengths: vec![3, 4] };
        assert_eq!((block.numel(), block.stored_shape()), (12, vec![3, 4]));
    }
}
