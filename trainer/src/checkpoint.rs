//! Training checkpoints: `OUTPUT_DIR/checkpoint-<step>/` holding
//! - `config.json` + `model.safetensors`: the weights as an HF Mixtral checkpoint (classic layout,
//!   f32, so resuming is exact and transformers can load them);
//! - `optimizer.mpk`: the AdamW moments and step counts (Burn's named MessagePack recorder at full
//!   precision);
//! - `trainer_state.json`: [`TrainerState`] (step, data position, seed, scheduler step, log history);
//! - `tokenizer.json` when the run used one;
//! - LoRA runs: `adapter_model.safetensors` + `adapter_config.json` (PEFT's format; the weights above
//!   are then the frozen base);
//! - sharded runs (FSDP1, FSDP2, EP): per rank `r`, in `ranks/rank<r>/`:
//!   - `optimizer.mpk` + `param_ids.json`: the rank's AdamW state for its shards;
//!   - `model_shard.safetensors` + `shard_index.json`: the weight data the rank owns (its FSDP2
//!     rows, FSDP1 flat pieces, experts; a replicated tensor only on the first rank of its replica
//!     group), as stored (see [`crate::rank_shards`]);
//!
//!   plus `shards.json` at the top: for every parameter its global shape and dtype and every piece
//!   (rank, file, block of the global tensor — per-dimension offsets and lengths — or, for FSDP1
//!   pieces, a range of the row-major flattened tensor), enough to reassemble any tensor without
//!   the trainer. Every rank writes its files into a staging directory, the ranks meet at a barrier,
//!   and rank 0 merges the ranks' indexes into `shards.json` and moves their files into the
//!   checkpoint before the final rename.
//!
//!   `--save-consolidated true` (the default) also writes the consolidated `model.safetensors`
//!   (HF layout, so transformers loads the checkpoint): every rank gathers one tensor at a time
//!   (FSDP1: one unit) and rank 0 streams it to disk ([`CheckpointWeights::Streamed`]), so 47B f32
//!   parameters never sit on one device or host; resume reads it, re-sharding with the
//!   deterministic plan. `--save-consolidated false` skips it: the checkpoint has `config.json` but no `model.safetensors`
//!   (and, for LoRA, no PEFT adapter files: the adapters are in the shards), and resume loads each
//!   rank's weights from the shards. Either way resuming needs the plan and world size that wrote
//!   the checkpoint (the error names both).
//!
//! A checkpoint is assembled in a hidden temporary directory and renamed into place only when
//! every file is written, so a crash never leaves a `checkpoint-<step>` that resume would trust.
//!
//! Optimizer state is keyed by Burn `ParamId`s, which are fresh for every model instance; the
//! state therefore stores the ids in module-visit order and resume maps them onto the ids of the
//! reloaded model by position.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Record, Recorder};
use burn::tensor::{Tensor, backend::Backend};
use mixtral_burn::checkpoint::SaveDtype;
use mixtral_burn::{MixtralConfig, MixtralForCausalLM, save_hf_classic};
use serde::{Deserialize, Serialize};

/// File name of the trainer state inside a checkpoint.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// Base name of the optimizer record (the recorder appends `.mpk`).
pub const OPTIMIZER_BASENAME: &str = "optimizer";
/// File name of the optimizer record.
pub const OPTIMIZER_FILE: &str = "optimizer.mpk";
/// Prefix of checkpoint directories.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// Why a checkpoint could not be written or resumed from. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The model weights or `config.json` could not be written or read.
    #[error(transparent)]
    Model(#[from] mixtral_burn::CheckpointError),
    /// A file or directory operation failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file is missing.
    #[error("checkpoint file {} is missing", .path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// `trainer_state.json` is not valid.
    #[error("invalid trainer state {}: {source}", .path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The optimizer record could not be written or read.
    #[error("optimizer state {}: {message}", .path.display())]
    Optimizer {
        /// The file.
        path: PathBuf,
        /// The recorder's reason.
        message: String,
    },
    /// A per-rank weight shard file is unreadable, truncated, or does not hold what its index says.
    #[error("invalid weight shard {}: {message}", .path.display())]
    Shard {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `--resume-from-checkpoint latest` found no checkpoint.
    #[error("no {CHECKPOINT_PREFIX}<step> directory with a {TRAINER_STATE_FILE} in {}", .dir.display())]
    NoCheckpoint {
        /// The output directory searched.
        dir: PathBuf,
    },
    /// The checkpoint does not belong to this model or these flags.
    #[error("checkpoint {} does not match this run: {message}", .path.display())]
    Mismatch {
        /// The file whose content disagrees.
        path: PathBuf,
        /// What differs, with the numbers.
        message: String,
    },
}

/// Everything besides weights and optimizer moments that a resumed run needs, in the spirit of
/// HF's `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub global_step: usize,
    /// Epochs completed, fractional.
    pub epoch: f64,
    /// Global micro-batches consumed: the data position ([`crate::data::DataOrder::batch`] of
    /// this index comes next). The shuffle is a pure function of seed and position, so this and
    /// the seed are the whole data-loader and RNG state.
    pub micro_batches_seen: usize,
    /// `--seed`.
    pub seed: u64,
    /// Steps the learning-rate schedule has advanced (equal to `global_step`).
    pub scheduler_step: usize,
    /// Total optimizer steps of the run.
    pub max_steps: usize,
    /// Examples per global micro-batch.
    pub global_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Tokens processed so far.
    pub tokens_seen: u64,
    /// Loss of the last evaluation, if any.
    pub last_eval_loss: Option<f64>,
    /// The lines of `metrics.jsonl` so far.
    pub log_history: Vec<serde_json::Value>,
    /// `ParamId`s of the saved model in module-visit order (keys of the optimizer record).
    pub param_ids: Vec<u64>,
    /// The parallel plan of a sharded run (`fsdp2`, `ddp+ep2(dp1)`, ...): the optimizer state is in
    /// `ranks/`, one directory per rank, and resuming needs the same plan and world size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharded: Option<String>,
    /// Ranks of the run that wrote the checkpoint (sharded runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
}

/// Name of the per-rank directory inside a checkpoint (and inside its staging directory).
fn rank_dir_name(rank: usize) -> String {
    format!("rank{rank}")
}

/// Where the ranks of a sharded run stage their files for the checkpoint of `step`.
#[must_use]
pub fn rank_staging_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!(".{CHECKPOINT_PREFIX}{step}.ranks"))
}

/// Where a sharded run's streamed consolidation ([`CheckpointWeights::Streamed`]) writes
/// `model.safetensors` and `config.json` before [`save_checkpoint`] moves them in.
pub fn consolidated_staging_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!(".{CHECKPOINT_PREFIX}{step}.consolidated"))
}

/// Writes one rank's optimizer record and the ids it is keyed by (its parameters in visit order)
/// into the staging directory of `step`.
///
/// # Errors
/// [`CheckpointError`] naming the file that could not be written.
pub fn stage_rank_state<B: Backend, R: Record<B>>(
    output_dir: &Path,
    step: usize,
    rank: usize,
    optimizer_record: R,
    param_ids: &[ParamId],
) -> Result<(), CheckpointError> {
    let dir = rank_staging_dir(output_dir, step).join(rank_dir_name(rank));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    write_optimizer_record(&dir, optimizer_record)?;
    let ids_path = dir.join(PARAM_IDS_FILE);
    let ids: Vec<u64> = param_ids.iter().map(ParamId::val).collect();
    let text = serde_json::to_string(&ids).map_err(|source| CheckpointError::State { path: ids_path.clone(), source })?;
    std::fs::write(&ids_path, text).map_err(io(&ids_path))
}

/// `dir/optimizer.mpk` (Burn's named MessagePack recorder at full precision).
fn write_optimizer_record<B: Backend, R: Record<B>>(dir: &Path, record: R) -> Result<(), CheckpointError> {
    NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .record(record, dir.join(OPTIMIZER_BASENAME))
        .map_err(|e| CheckpointError::Optimizer { path: dir.join(OPTIMIZER_FILE), message: e.to_string() })
}

/// File of a rank's parameter ids inside `ranks/rank<r>/`.
pub const PARAM_IDS_FILE: &str = "param_ids.json";

/// Reads rank `rank`'s optimizer record of a sharded checkpoint, re-keyed onto `current` (the ids
/// of this rank's re-sharded model, same visit order).
///
/// # Errors
/// As [`load_optimizer_record`], naming the rank's files.
pub fn load_rank_optimizer_record<B: Backend, T, R>(
    dir: &Path,
    rank: usize,
    current: &[ParamId],
    device: &B::Device,
) -> Result<R, CheckpointError>
where
    R: Record<B> + IntoIterator<Item = (ParamId, T)> + FromIterator<(ParamId, T)>,
{
    let rank_dir = dir.join("ranks").join(rank_dir_name(rank));
    let ids_path = rank_dir.join(PARAM_IDS_FILE);
    if !ids_path.is_file() {
        return Err(CheckpointError::Missing { path: ids_path });
    }
    let text = std::fs::read_to_string(&ids_path).map_err(io(&ids_path))?;
    let saved: Vec<u64> = serde_json::from_str(&text).map_err(|source| CheckpointError::State { path: ids_path.clone(), source })?;
    load_keyed_record(&rank_dir, &saved, &ids_path, current, device)
}

/// The parameter ids of `module` in visit order (deterministic for a given architecture).
#[must_use]
pub fn param_ids<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

/// Directory of the checkpoint of `step` in `output_dir`.
#[must_use]
pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("{CHECKPOINT_PREFIX}{step}"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// The weights a checkpoint receives (see [`save_checkpoint`]).
pub enum CheckpointWeights<'a, B: Backend> {
    /// The whole model, written here (HF classic layout, f32; and its adapters when the run has any).
    Full(&'a MixtralForCausalLM<B>),
    /// `model.safetensors` and `config.json` already written into `dir` by a streamed consolidation
    /// ([`crate::sharding::Parallel::save_consolidated`]), moved in; `adapters`: a model whose LoRA
    /// adapters are whole (the frozen base may stay sharded), for PEFT's files.
    Streamed {
        /// Where the files are.
        dir: &'a Path,
        /// The model to take the adapters from.
        adapters: Option<&'a MixtralForCausalLM<B>>,
    },
    /// None: a sharded run with `--save-consolidated false`, whose weights are only in its per-rank
    /// shards (`config.json` is still written).
    ShardsOnly,
}

/// Writes `checkpoint-<state.global_step>` into `output_dir` atomically (see the module docs) and
/// returns its path. An existing checkpoint of the same step is replaced.
///
/// `model`: what goes in as weights ([`CheckpointWeights`]). `rank_states` is the
/// staging directory of a sharded run ([`rank_staging_dir`]): it becomes `ranks/`, and the ranks'
/// weight-shard indexes are merged into `shards.json` ([`crate::rank_shards`]).
///
/// # Errors
/// [`CheckpointError`] naming the file that could not be written.
pub fn save_checkpoint<B: Backend, R: Record<B>>(
    output_dir: &Path,
    model: CheckpointWeights<'_, B>,
    config: &MixtralConfig,
    optimizer_record: R,
    state: &TrainerState,
    tokenizer_json: Option<&Path>,
    rank_states: Option<&Path>,
    adapters: Option<&(mixtral_burn::LoraConfig, mixtral_burn::LoraTargets)>,
) -> Result<PathBuf, CheckpointError> {
    let dir = checkpoint_dir(output_dir, state.global_step);
    let tmp = output_dir.join(format!(".{CHECKPOINT_PREFIX}{}.tmp", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    match model {
        CheckpointWeights::Full(model) => {
            save_hf_classic(model, config, &tmp, SaveDtype::F32)?;
            if let Some((lora, targets)) = adapters {
                mixtral_burn::save_peft_adapter(model, lora, *targets, &tmp)?;
            }
        }
        CheckpointWeights::Streamed { dir, adapters: with_adapters } => {
            for name in ["model.safetensors", "config.json"] {
                std::fs::rename(dir.join(name), tmp.join(name)).map_err(io(&dir.join(name)))?;
            }
            std::fs::remove_dir(dir).map_err(io(dir))?;
            if let (Some(model), Some((lora, targets))) = (with_adapters, adapters) {
                mixtral_burn::save_peft_adapter(model, lora, *targets, &tmp)?;
            }
        }
        CheckpointWeights::ShardsOnly => {
            // Weights only in the per-rank shards; the architecture still travels with them.
            let path = tmp.join("config.json");
            let mut json = config.to_hf_json();
            json["torch_dtype"] = "float32".into();
            let text = serde_json::to_string_pretty(&json).map_err(|source| CheckpointError::State { path: path.clone(), source })?;
            std::fs::write(&path, text).map_err(io(&path))?;
        }
    }
    write_optimizer_record(&tmp, optimizer_record)?;
    if let Some(src) = tokenizer_json {
        let dst = tmp.join("tokenizer.json");
        std::fs::copy(src, &dst).map_err(io(src))?;
    }
    let state_path = tmp.join(TRAINER_STATE_FILE);
    let text = serde_json::to_string_pretty(state)
        .map_err(|source| CheckpointError::State { path: state_path.clone(), source })?;
    std::fs::write(&state_path, text).map_err(io(&state_path))?;
    if let Some(staged) = rank_states {
        if let Some(index) = crate::rank_shards::merge_rank_indexes(staged)? {
            crate::rank_shards::write_shards_index(&tmp, &index)?;
        }
        let ranks = tmp.join("ranks");
        std::fs::rename(staged, &ranks).map_err(io(staged))?;
    }

    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    Ok(dir)
}

/// The `checkpoint-<step>` directories of `output_dir` that hold a trainer state, oldest first.
///
/// # Errors
/// [`CheckpointError::Io`] if `output_dir` cannot be listed.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>, CheckpointError> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(source) => return Err(CheckpointError::Io { path: output_dir.to_path_buf(), source }),
    };
    for entry in entries {
        let entry = entry.map_err(io(output_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix(CHECKPOINT_PREFIX).and_then(|s| s.parse::<usize>().ok())
            && entry.path().join(TRAINER_STATE_FILE).is_file()
        {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes the oldest checkpoints of `output_dir` until at most `limit` remain.
///
/// # Errors
/// [`CheckpointError::Io`] naming the directory that could not be removed.
pub fn rotate_checkpoints(output_dir: &Path, limit: usize) -> Result<(), CheckpointError> {
    let all = list_checkpoints(output_dir)?;
    let excess = all.len().saturating_sub(limit);
    for (_, dir) in &all[..excess] {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    Ok(())
}

/// Resolves `--resume-from-checkpoint`: `latest` is the newest checkpoint in `output_dir`, anything
/// else a directory path.
///
/// # Errors
/// [`CheckpointError::NoCheckpoint`] or [`CheckpointError::Missing`].
pub fn resolve_checkpoint(spec: &str, output_dir: &Path) -> Result<PathBuf, CheckpointError> {
    if spec == "latest" {
        return list_checkpoints(output_dir)?
            .pop()
            .map(|(_, dir)| dir)
            .ok_or_else(|| CheckpointError::NoCheckpoint { dir: output_dir.to_path_buf() });
    }
    let dir = PathBuf::from(spec);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(CheckpointError::Missing { path: dir })
    }
}

/// Reads `trainer_state.json` of a checkpoint.
///
/// # Errors
/// [`CheckpointError::Missing`], [`CheckpointError::Io`] or [`CheckpointError::State`].
pub fn load_trainer_state(dir: &Path) -> Result<TrainerState, CheckpointError> {
    let path = dir.join(TRAINER_STATE_FILE);
    if !path.is_file() {
        return Err(CheckpointError::Missing { path });
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|source| CheckpointError::State { path, source })
}

/// Reads the optimizer record of a checkpoint and re-keys it from the saved `ParamId`s
/// (`state.param_ids`) to `current` (the ids of the reloaded model, same visit order).
///
/// # Errors
/// [`CheckpointError::Missing`] / [`CheckpointError::Optimizer`] for an absent or unreadable
/// file, [`CheckpointError::Mismatch`] if the record does not fit the model.
pub fn load_optimizer_record<B: Backend, T, R>(
    dir: &Path,
    state: &TrainerState,
    current: &[ParamId],
    device: &B::Device,
) -> Result<R, CheckpointError>
where
    // Burn's optimizer records are `hashbrown` maps keyed by `ParamId`; any such map works.
    R: Record<B> + IntoIterator<Item = (ParamId, T)> + FromIterator<(ParamId, T)>,
{
    load_keyed_record(dir, &state.param_ids, &dir.join(TRAINER_STATE_FILE), current, device)
}

/// `dir/optimizer.mpk` re-keyed from `saved` ids (listed in `ids_path`) onto `current`, by position.
fn load_keyed_record<B: Backend, T, R>(
    dir: &Path,
    saved: &[u64],
    ids_path: &Path,
    current: &[ParamId],
    device: &B::Device,
) -> Result<R, CheckpointError>
where
    R: Record<B> + IntoIterator<Item = (ParamId, T)> + FromIterator<(ParamId, T)>,
{
    let path = dir.join(OPTIMIZER_FILE);
    if !path.is_file() {
        return Err(CheckpointError::Missing { path });
    }
    let record: R = NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .load(dir.join(OPTIMIZER_BASENAME), device)
        .map_err(|e| CheckpointError::Optimizer { path: path.clone(), message: e.to_string() })?;
    if saved.len() != current.len() {
        return Err(CheckpointError::Mismatch {
            path: ids_path.to_path_buf(),
            message: format!("it lists {} parameters, the model has {}", saved.len(), current.len()),
        });
    }
    let by_saved: HashMap<u64, ParamId> = saved.iter().copied().zip(current.iter().copied()).collect();
    record
        .into_iter()
        .map(|(id, value)| {
            let new = by_saved.get(&id.val()).ok_or_else(|| CheckpointError::Mismatch {
                path: path.clone(),
                message: format!("optimizer state for parameter {id} which {} does not list", ids_path.display()),
            })?;
            Ok((*new, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainerState {
        TrainerState {
            global_step: step,
            epoch: 0.5,
            micro_batches_seen: step,
            seed: 1,
            scheduler_step: step,
            max_steps: 10,
            global_batch_size: 2,
            gradient_accumulation_steps: 1,
            tokens_seen: 7,
            last_eval_loss: None,
            log_history: vec![serde_json::json!({"step": 1, "loss": 2.0, "learning_rate": 0.1})],
            param_ids: vec![],
            sharded: None,
            world_size: None,
        }
    }

    #[test]
    fn latest_rotation_and_errors_name_files() {
        type B = burn::backend::NdArray<f32>;
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        let config = MixtralConfig::tiny();
        let model: MixtralForCausalLM<B> = config.init_seeded(&Default::default(), 1);
        assert!(matches!(resolve_checkpoint("latest", out), Err(CheckpointError::NoCheckpoint { .. })));
        for step in [2, 10, 4] {
            save_checkpoint::<B, _>(out, CheckpointWeights::Full(&model), &config, (), &state(step), None, None, None).unwrap();
        }
        // A half-written checkpoint (no trainer state) and a temp dir are never "latest".
        std::fs::create_dir_all(out.join("checkpoint-99")).unwrap();
        std::fs::create_dir_all(out.join(".checkpoint-50.tmp")).unwrap();
        assert_eq!(resolve_checkpoint("latest", out).unwrap(), out.join("checkpoint-10"));
        assert_eq!(load_trainer_state(&out.join("checkpoint-4")).unwrap(), state(4));
        for f in ["config.json", "model.safetensors", OPTIMIZER_FILE, TRAINER_STATE_FILE] {
            assert!(out.join("checkpoint-4").join(f).is_file(), "{f}");
        }
        rotate_checkpoints(out, 2).unwrap();
        let left: Vec<usize> = list_checkpoints(out).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, vec![4, 10]);

        let err = load_trainer_state(&out.join("checkpoint-99")).unwrap_err();
        assert!(err.to_string().contains("checkpoint-99/trainer_state.json"), "{err}");
        std::fs::write(out.join("checkpoint-4").join(TRAINER_STATE_FILE), "{\"global_step\": 4").unwrap();
        let err = load_trainer_state(&out.join("checkpoint-4")).unwrap_err();
        assert!(matches!(err, CheckpointError::State { .. }) && err.to_string().contains("checkpoint-4/trainer_state.json"), "{err}");
        let err = resolve_checkpoint(out.join("nope").to_str().unwrap(), out).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
