//! The training loop: tiny (or given) Mixtral, AdamW, linear warm-up/decay, gradient accumulation
//! normalised by the global number of target tokens, global-norm gradient clipping, metrics files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, backend::AutodiffBackend};
use burn_moe_backend::dist::{CollectiveBackend, CommConfig, CommError, Communicator, ThreadComm};
use burn_moe_backend::{DeviceMemory, MemoryBackend, MoeAuxStats, MoeBackend};
use indicatif::{ProgressBar, ProgressStyle};
use mixtral_burn::{HfCheckpoint, LazyWeights, MixtralConfig, MixtralForCausalLM};

use crate::checkpoint::{
    CheckpointError, TrainerState, load_optimizer_record, load_rank_optimizer_record, load_trainer_state, param_ids,
    CheckpointWeights, consolidated_staging_dir, rank_staging_dir, resolve_checkpoint, rotate_checkpoints, save_checkpoint,
    stage_rank_state,
};
use crate::cli::{Args, IntervalStrategy};
use crate::data::{Batch, DataError, DataLoader, TrainDataset, load_records};
use crate::metrics::{MetricsError, MetricsWriter, StepMetrics, TrainSummary};
use crate::parallel::all_reduce_scalars;
use crate::sharding::{Parallel, ShardingError};
pub use crate::schedule::linear_schedule;
use crate::schedule::{learning_rate, warmup_steps};
use crate::tokenizer::{HfTokenizer, Tokenizer, TokenizerError, VOCAB_SIZE};

/// Why a training run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The dataset could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Metrics could not be written.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The model config is inconsistent with the tokenizer or invalid.
    #[error(transparent)]
    Config(#[from] mixtral_burn::ConfigError),
    /// The `--model-path` weights could not be loaded.
    #[error(transparent)]
    Model(#[from] mixtral_burn::CheckpointError),
    /// The tokenizer of `--model-path` is unusable.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A training checkpoint could not be written or resumed from.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A collective between data-parallel ranks failed (a peer died, timed out, or disagreed).
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The parallel plan could not be set up or a sharded collective failed.
    #[error(transparent)]
    Sharding(#[from] ShardingError),
    /// Flags that contradict each other.
    #[error("invalid arguments: {0}")]
    Args(String),
    /// The device reported a failed kernel (with `BURN_MOE_SYNC_CHECK=1`, named by the place it
    /// was found: [`crate::timers::sync_check`]).
    #[error("device error after {after}: {detail}")]
    Device {
        /// The last piece of work queued before the failure was found.
        after: String,
        /// What the device said.
        detail: String,
    },
    /// The loss stopped being a finite number.
    #[error("loss became {value} at step {step}; lower --learning-rate or check the data")]
    NonFiniteLoss {
        /// Optimizer step.
        step: usize,
        /// The value.
        value: f64,
    },
}

/// The model the trainer fine-tunes without `--model-path`: [`MixtralConfig::tiny`], whose vocabulary
/// matches the byte-level tokenizer, or the architecture of `--model-config` (random weights).
pub fn default_model_config(args: &Args) -> Result<MixtralConfig, TrainError> {
    if let Some(path) = &args.model_config {
        let config = MixtralConfig::from_hf_json_file(path)?.with_moe_kernel(args.kernel());
        config.validate(&path.display().to_string())?;
        if config.vocab_size < VOCAB_SIZE {
            return Err(TrainError::Args(format!(
                "{}: vocab_size {} is smaller than the byte-level tokenizer's {VOCAB_SIZE}",
                path.display(),
                config.vocab_size
            )));
        }
        return Ok(config);
    }
    let config = MixtralConfig::tiny().with_moe_kernel(args.kernel());
    config.validate("tiny preset")?;
    assert_eq!(config.vocab_size, VOCAB_SIZE, "tiny preset and byte tokenizer disagree");
    Ok(config)
}

/// Model config, tokenizer and (for `--model-path`) the opened checkpoint of a run.
pub struct ModelSource {
    /// The architecture.
    pub config: MixtralConfig,
    /// The tokenizer matching it.
    pub tokenizer: Tokenizer,
    /// The pretrained weights, when `--model-path` is given.
    pub checkpoint: Option<HfCheckpoint>,
    /// `tokenizer.json` of `--model-path` (copied into training checkpoints).
    pub tokenizer_json: Option<PathBuf>,
}

/// Opens `--model-path` (config, weights header, `tokenizer.json`), or describes the tiny preset
/// with the byte tokenizer when it is absent.
///
/// # Errors
/// [`TrainError::Model`] / [`TrainError::Tokenizer`] naming the file at fault.
pub fn model_source(args: &Args) -> Result<ModelSource, TrainError> {
    let Some(dir) = &args.model_path else {
        return Ok(ModelSource {
            config: default_model_config(args)?,
            tokenizer: Tokenizer::default(),
            checkpoint: None,
            tokenizer_json: None,
        });
    };
    let checkpoint = HfCheckpoint::open(dir)?;
    let config = checkpoint.config.clone().with_moe_kernel(args.kernel());
    let path = dir.join("tokenizer.json");
    let tokenizer = HfTokenizer::from_file(&path, config.vocab_size, config.bos_token_id, config.eos_token_id)?;
    Ok(ModelSource { config, tokenizer: Tokenizer::Hf(tokenizer), checkpoint: Some(checkpoint), tokenizer_json: Some(path) })
}

/// Evaluation result: mean next-token cross-entropy over every target token of the set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOutput {
    /// `sum of token losses / n_target_tokens`.
    pub loss: f64,
    /// Target tokens of the set.
    pub n_target_tokens: usize,
}

/// Language-model loss of `model` over `dataset` (in file order, `batch_size` rows per forward),
/// without gradients and without the load-balancing term.
pub fn evaluate<B: MoeBackend>(
    model: &MixtralForCausalLM<B>,
    dataset: &TrainDataset,
    batch_size: usize,
    device: &B::Device,
) -> EvalOutput {
    let indices: Vec<usize> = (0..dataset.len()).collect();
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = dataset.collate(chunk);
        let real = batch.real_tokens();
        let out = model.forward_with_labels_masked(
            batch.input_ids_tensor::<B>(device),
            batch.labels_tensor::<B>(device),
            Some(&real),
        );
        sum += scalar(out.lm_loss_sum);
        n += batch.n_target_tokens;
    }
    EvalOutput { loss: sum / n.max(1) as f64, n_target_tokens: n }
}

/// One batch through the plan's forward pass: `live` from [`Parallel::materialize`], tokens moved to
/// their experts by the plan's dispatcher; a collective that failed inside the model is an error.
fn plan_forward<B, C>(
    parallel: &Parallel<B, C>,
    live: &MixtralForCausalLM<B>,
    batch: &Batch,
    device: &B::Device,
) -> Result<mixtral_burn::CausalLmOutput<B>, TrainError>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = <B as AutodiffBackend>::InnerBackend>,
    C: Communicator<B::InnerBackend> + 'static,
{
    let real = batch.real_tokens();
    let out = live.forward_with_labels_dispatched(
        batch.input_ids_tensor::<B>(device),
        batch.labels_tensor::<B>(device),
        Some(&real),
        parallel.dispatcher(),
    );
    parallel.check()?;
    Ok(out)
}

/// [`evaluate`] on several ranks, the way they train: every rank runs its slice of each eval batch
/// (`batch_size` examples per rank) on the plan's materialized model with its token dispatcher, so
/// no rank needs the whole model (experts stay on their ranks, FSDP shards are gathered as for a
/// training step); the loss sums and target-token counts are all-reduced. Under expert parallelism
/// a rank with an empty slice still runs one padding token, since the forward has collectives.
///
/// # Errors
/// A failed gather or collective.
pub fn evaluate_parallel<B, C>(
    parallel: &Parallel<B, C>,
    model: &MixtralForCausalLM<B>,
    dataset: &TrainDataset,
    batch_size: usize,
    comm: &C,
    device: &B::Device,
) -> Result<EvalOutput, TrainError>
where
    B: AutodiffBackend + MoeBackend + CollectiveBackend<Wire = <B as AutodiffBackend>::InnerBackend>,
    B::InnerBackend: MoeBackend,
    C: Communicator<B::InnerBackend> + 'static,
{
    let (world, rank, per) = (comm.size(), comm.rank(), batch_size.max(1));
    // Per-layer FSDP evaluates one gathered unit at a time too.
    let live = if parallel.per_layer() { None } else { Some(parallel.materialize(model)?) };
    let indices: Vec<usize> = (0..dataset.len()).collect();
    let idle = Batch::idle();
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in indices.chunks(per * world) {
        let mine = &chunk[(rank * per).min(chunk.len())..((rank + 1) * per).min(chunk.len())];
        let collated = dataset.collate(mine);
        let batch = if collated.batch > 0 {
            &collated
        } else if parallel.lockstep() {
            &idle
        } else {
            continue;
        };
        sum += match &live {
            Some(live) => scalar(plan_forward(parallel, live, batch, device)?.lm_loss_sum),
            None => crate::layerwise::loss_sum(parallel, model, batch, device)?,
        };
        n += batch.n_target_tokens;
    }
    let totals = all_reduce_scalars::<B::InnerBackend, C>(&[sum, n as f64], comm, device)?;
    Ok(EvalOutput { loss: totals[0] / totals[1].max(1.0), n_target_tokens: totals[1] as usize })
}

fn build_dataset(args: &Args, path: Option<&Path>, tokenizer: &Tokenizer, pack: bool) -> Result<TrainDataset, DataError> {
    let records = load_records(path)?;
    if pack {
        TrainDataset::new_packed(&records, args.prompt_template, args.max_seq_length, tokenizer)
    } else {
        TrainDataset::new(&records, args.prompt_template, args.max_seq_length, tokenizer)
    }
}

/// Whether optimizer step `step` (0-based) is the last of an epoch, for `micro` micro-batches per
/// step and `bpe` micro-batches per epoch.
fn ends_epoch(step: usize, micro: usize, bpe: usize) -> bool {
    (step + 1) * micro / bpe > step * micro / bpe
}

fn due(strategy: IntervalStrategy, step: usize, every: usize, epoch_end: bool) -> bool {
    match strategy {
        IntervalStrategy::No => false,
        IntervalStrategy::Steps => (step + 1).is_multiple_of(every),
        IntervalStrategy::Epoch => epoch_end,
    }
}

/// Runs the whole training job on `device` and writes `metrics.jsonl`, `train_summary.json` and
/// the requested checkpoints into `--output-dir`.
///
/// # Errors
/// [`TrainError`] for unreadable data, model or checkpoint files, unwritable outputs, or a
/// diverging loss.
pub fn train<B>(args: &Args, device: &B::Device) -> Result<TrainSummary, TrainError>
where
    B: AutodiffBackend + MoeBackend + MemoryBackend + CollectiveBackend<Wire = <B as AutodiffBackend>::InnerBackend>,
    B::InnerBackend: MoeBackend,
{
    let solo = ThreadComm::<B::InnerBackend>::world(1, std::slice::from_ref(device), CommConfig::default())?
        .remove(0);
    train_with::<B, _>(args, device, &solo)
}

/// [`train`] as one data-parallel rank of `comm` (DDP: every rank holds the whole model).
///
/// Rank `r` of `n` takes its slice of each global batch of `per_device_train_batch_size × n`
/// examples (the order does not depend on `n`); losses are divided by the *global* number of target
/// tokens and the load-balancing statistics are pooled over all ranks, so the summed gradient — and
/// therefore every update and logged loss — equals a single-device run on the global batch. Rank 0
/// alone writes metrics, evaluates and saves checkpoints; other ranks write their metrics under
/// `--output-dir/rank<r>/`.
///
/// # Errors
/// As [`train`], plus [`TrainError::Comm`] when a collective fails.
pub fn train_with<B, C>(args: &Args, device: &B::Device, comm: &C) -> Result<TrainSummary, TrainError>
where
    B: AutodiffBackend + MoeBackend + MemoryBackend + CollectiveBackend<Wire = <B as AutodiffBackend>::InnerBackend>,
    B::InnerBackend: MoeBackend,
    C: Communicator<B::InnerBackend> + 'static,
{
    let (rank, world) = (comm.rank(), comm.size());
    let lead = rank == 0;
    let output_dir = if lead { args.output_dir.clone() } else { args.output_dir.join(format!("rank{rank}")) };
    if args.evaluation_strategy != IntervalStrategy::No && args.eval_data_path.is_none() {
        return Err(TrainError::Args(format!(
            "--evaluation-strategy {:?} needs --eval-data-path",
            args.evaluation_strategy
        )));
    }
    // Before any data or weights are read.
    crate::precision::check_support::<B>(args.dtype, device).map_err(TrainError::Args)?;
    if args.gradient_checkpointing && args.fsdp_gather == crate::sharding::FsdpGather::Step {
        return Err(TrainError::Args(
            "--gradient-checkpointing recomputes the model layer by layer, --fsdp-gather step runs it whole with every layer's \
             activations: use --fsdp-gather auto, layer or prefetch with it"
                .into(),
        ));
    }
    let compute = args.dtype.compute();
    let source = model_source(args)?;
    let tokenizer = &source.tokenizer;
    let dataset = build_dataset(args, args.data_path.as_deref(), tokenizer, args.packing)?;
    // Evaluation rows are never packed: the loss stays a per-example quantity.
    let eval_dataset = match &args.eval_data_path {
        Some(p) if args.evaluation_strategy != IntervalStrategy::No => {
            Some(build_dataset(args, Some(p), tokenizer, false)?)
        }
        _ => None,
    };
    let accum = args.gradient_accumulation_steps;
    let loader = DataLoader::new(&dataset, args.per_device_train_batch_size, args.seed)?
        .with_ranks(world, rank)?
        .with_gradient_accumulation_steps(accum);
    let order = loader.order();
    let bpe = loader.batches_per_epoch();
    let total_steps = args.total_train_steps(bpe);
    let warmup = warmup_steps(args.warmup_steps, args.warmup_ratio, total_steps);

    let config = source.config.clone();
    let resume = match &args.resume_from_checkpoint {
        Some(spec) => {
            let dir = resolve_checkpoint(spec, &args.output_dir)?;
            let state = load_trainer_state(&dir)?;
            let state_path = dir.join(crate::checkpoint::TRAINER_STATE_FILE);
            for (what, saved, now) in [
                ("seed", state.seed, args.seed),
                ("global batch size", state.global_batch_size as u64, order.global_batch_size as u64),
                ("gradient accumulation steps", state.gradient_accumulation_steps as u64, accum as u64),
            ] {
                if saved != now {
                    return Err(CheckpointError::Mismatch {
                        path: state_path,
                        message: format!("{what} was {saved}, this run has {now}"),
                    }
                    .into());
                }
            }
            Some((dir, state))
        }
        None => None,
    };

    let num_experts = config.num_local_experts;
    let ep_size = args.effective_ep_size(world);
    let mut parallel = Parallel::<B, C>::new(comm, args.sharding, ep_size, num_experts)?
        .with_compute_dtype(compute)
        .with_fsdp_gather(args.fsdp_gather)
        .with_layer_recompute(args.gradient_checkpointing);
    // Expert parallelism: each rank's model holds only its own experts. Not with adapters on the
    // experts: their A matrices come from one RNG stream over all experts, drawn before the cut, so
    // that every rank count trains the same adapters; the base experts are then held whole until the
    // plan cuts them, and (loaded lazily) even then only this rank's are read.
    let lora_on_experts = args.lora().is_some_and(|(targets, _)| targets == mixtral_burn::LoraTargets::All);
    let local_experts = parallel.expert_range().filter(|_| !lora_on_experts);
    // A sharded checkpoint saved with `--save-consolidated false` has no `model.safetensors`: each
    // rank reads its own weight shards once the plan has cut the model (below).
    let from_shards = resume.as_ref().is_some_and(|(dir, state)| state.sharded.is_some() && !dir.join("model.safetensors").is_file());
    // Checkpoint weights are loaded lazily: nothing is read until the plan has said which piece of
    // each parameter this rank keeps (`Parallel::shard_lazy`), so no rank holds the whole model.
    let mut lazy = LazyWeights::default();
    // The checkpoint to read: the one resumed from (its consolidated weights), else `--model-path`.
    let resumed = match &resume {
        Some((dir, _)) if !from_shards => Some(HfCheckpoint::open(dir)?),
        _ => None,
    };
    let mut model: MixtralForCausalLM<B> = match (&resume, resumed.as_ref().or(source.checkpoint.as_ref())) {
        // Every value is overwritten from the shards: zeros, and with EP only this rank's experts.
        (Some(_), _) if from_shards => {
            config.init_zeros(device, parallel.expert_range().map_or(config.num_local_experts, |r| r.len()))
        }
        (_, Some(ckpt)) => {
            let (model, weights) = ckpt.load_model_lazy(device, args.kernel(), local_experts)?;
            lazy = weights;
            model
        }
        // A given architecture (`--model-config`, real-sized ones): drawn lazily, like a checkpoint
        // is read, so each rank draws the pieces the plan gives it and never holds the whole model
        // (Mixtral-8x7B is 188 GB in f32). Each matrix has its own seeded stream, so every rank,
        // and every rank count, draws the same values; on the GPU from the device RNG (a host RNG
        // would take minutes for billions of weights).
        (_, None) if args.model_config.is_some() => {
            let rng = if args.device == crate::cli::Device::Cuda { mixtral_burn::InitRng::Device } else { mixtral_burn::InitRng::Host };
            let (model, weights) = config.init_lazy(device, args.seed, rng);
            lazy = weights;
            model
        }
        // Weights from a host RNG: the backend's RNG is process-global, so concurrent runs (tests,
        // in-process ranks) would otherwise draw each other's numbers.
        (_, None) => config.init_seeded(device, args.seed),
    };
    model = model.with_attention_kernel(args.attention, None);
    if let Some((targets, lora)) = args.lora() {
        lora.validate().map_err(|e| TrainError::Args(e.to_string()))?;
        model = model.with_lora(&lora, targets, args.seed);
        if let Some((dir, _)) = resume.as_ref().filter(|_| !from_shards) {
            // The checkpoint's weights are the frozen base; its adapters are in PEFT's file (or,
            // without consolidated weights, in the rank shards with the rest).
            model = mixtral_burn::load_peft_adapter(model, dir)?;
        }
        tracing::info!(r = lora.r, alpha = lora.alpha, dropout = lora.dropout, ?targets, "LoRA: base weights frozen");
    }
    if let Some(c) = compute {
        model = crate::precision::freeze_in(model, c);
        tracing::info!(dtype = %args.dtype, "mixed precision: f32 master weights and optimizer state");
    }
    tracing::info!(
        parameters = model.num_parameters(),
        examples = dataset.len(),
        total_steps,
        warmup,
        moe_kernel = %args.kernel(),
        attention = %args.attention,
        grouped_gemm = %args.grouped_gemm,
        "training {}",
        args.model_path.as_ref().map_or_else(|| "tiny Mixtral".to_owned(), |p| p.display().to_string())
    );

    if let Some((dir, state)) = &resume {
        // The optimizer state of a sharded run is per rank and per shard: only the same plan on the
        // same number of ranks can take it up.
        let now = parallel.is_sharded().then(|| (parallel.describe(), world));
        let then = state.sharded.clone().map(|plan| (plan, state.world_size.unwrap_or(0)));
        if now != then {
            let says = |p: &Option<(String, usize)>| p.as_ref().map_or_else(|| "unsharded".to_owned(), |(plan, n)| format!("{plan} on {n} ranks"));
            return Err(CheckpointError::Mismatch {
                path: dir.join(crate::checkpoint::TRAINER_STATE_FILE),
                message: format!("written by a {} run, this run is {}", says(&then), says(&now)),
            }
            .into());
        }
    }
    model = parallel.shard_lazy(model, &lazy);
    if lazy.elements_read() > 0 {
        tracing::info!(rank, elements = lazy.elements_read(), "checkpoint elements read by this rank");
    }
    if let Some((dir, _)) = resume.as_ref().filter(|_| from_shards) {
        let piece = |id: ParamId, dims: &[usize]| parallel.local_piece(id, dims);
        model = crate::rank_shards::load_rank_shards::<B, _, _>(dir, model, rank, world, &parallel.describe(), &piece)?;
        tracing::info!("rank {rank}: weights from {}", dir.join("ranks").join(format!("rank{rank}")).display());
    }
    if world > 1 {
        tracing::info!(plan = %parallel.describe(), world, "parallel plan");
    }
    // On a GPU, the weights this rank keeps (and so their gradients, moments and compute copies,
    // which take the same sizes) in exact-size buffers instead of the allocator's large pages:
    // see `persistent_params`. `BURN_MOE_PERSISTENT_PARAMS=0` leaves them in the pages (to compare).
    // FSDP1's whole-unit buffers likewise (allocated once per unit and micro-batch;
    // `BURN_MOE_PERSISTENT_SIZES=0` leaves them in the pages).
    let enabled = |var: &str| std::env::var(var).map_or(true, |v| v.trim() != "0");
    if B::device_memory(device).is_some() && enabled("BURN_MOE_PERSISTENT_PARAMS") {
        model = burn_moe_backend::persistent_params(model, device);
        if enabled("BURN_MOE_PERSISTENT_SIZES") {
            burn_moe_backend::persistent_sizes::<B::InnerBackend>(device, &parallel.unit_buffer_sizes());
        }
    }

    // burn-optim's AdamW (the same numbers and checkpoint state); with `--fused-adamw` the update is
    // one pass per parameter on CubeCL backends.
    let grad_scale = burn_moe_backend::GradScale::default();
    let adamw = burn_moe_backend::FusedAdamW {
        beta_1: args.adam_beta1 as f32,
        beta_2: args.adam_beta2 as f32,
        epsilon: args.adam_epsilon as f32,
        weight_decay: args.weight_decay as f32,
        fused: args.fused_adamw,
        grad_scale: grad_scale.clone(),
    };
    // Mixed precision with the fused update: it also writes the next step's compute copy of each
    // weight, which the forward pass takes where weights are rounded whole (not under FSDP, whose
    // shards are rounded as they are gathered, so copies would only be held).
    let copies = compute
        .filter(|_| args.fused_adamw && parallel.rounds_whole_weights())
        .map(burn_moe_backend::ComputeCopies::<B::InnerBackend>::new);
    parallel = parallel.with_compute_copies(copies.clone());
    let mut optimizer = match copies {
        Some(c) => adamw.init_with_copies::<B, MixtralForCausalLM<B>>(c),
        None => adamw.init::<B, MixtralForCausalLM<B>>(),
    };
    let (start_step, mut tokens, mut last_eval, metrics) = match &resume {
        Some((dir, state)) => {
            let ids = param_ids::<B, _>(&model);
            let record = if parallel.is_sharded() {
                load_rank_optimizer_record::<B, _, _>(dir, rank, &ids, device)?
            } else {
                load_optimizer_record::<B, _, _>(dir, state, &ids, device)?
            };
            optimizer = optimizer.load_record(record);
            tracing::info!(step = state.global_step, "resumed from {}", dir.display());
            (
                state.global_step,
                state.tokens_seen,
                state.last_eval_loss,
                MetricsWriter::resume(&output_dir, &state.log_history)?,
            )
        }
        None => (0, 0u64, None, MetricsWriter::create(&output_dir)?),
    };
    let mut metrics = if lead && args.report_to == crate::cli::ReportTo::Tensorboard {
        let metrics = metrics.with_tensorboard(&args.output_dir.join(crate::tensorboard::TENSORBOARD_DIR))?;
        tracing::info!("TensorBoard events: {}", metrics.tensorboard_path().map(|p| p.display().to_string()).unwrap_or_default());
        metrics
    } else {
        metrics
    };

    let progress = if lead { ProgressBar::new(total_steps as u64) } else { ProgressBar::hidden() };
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("static progress template"),
    );
    progress.set_position(start_step as u64);
    let start = Instant::now();
    // Allocator peaks (GPU backends), sampled after each forward pass and each optimizer step.
    let mut mem_peak: Option<DeviceMemory> = None;
    let sample_memory = |peak: &mut Option<DeviceMemory>| {
        if let Some(m) = B::device_memory(device) {
            let p = peak.get_or_insert_with(DeviceMemory::default);
            p.bytes_in_use = p.bytes_in_use.max(m.bytes_in_use);
            p.bytes_reserved = p.bytes_reserved.max(m.bytes_reserved);
        }
    };
    let mut timers = crate::timers::StepTimers::<B>::from_env(device);
    for step in start_step..total_steps {
        timers.start();
        if args.lora().is_some() {
            // Adapter dropout draws from the backend RNG (the adapters themselves come from a host
            // RNG): seeded per step, so a resumed run draws the masks the uninterrupted one did.
            B::seed(device, args.seed.wrapping_add(step as u64));
        }
        let lr = learning_rate(args.lr_scheduler_type, args.learning_rate, step, warmup, total_steps);
        let micro: Vec<Batch> = (0..accum).map(|m| loader.micro_batch(step, m)).collect();
        // Under mixed precision a gradient that is neither accumulated nor reduced goes to the fused
        // optimizer as it is, which widens it in its own pass (`Parallel::widens_grad`).
        let keep_narrow = args.fused_adamw && accum == 1;
        // Every micro-batch's token losses are divided by the target tokens of the whole step (over
        // all ranks), so the accumulated gradient is that of one big batch however it is split.
        let local_targets = micro.iter().map(|b| b.n_target_tokens).sum::<usize>() as f64;
        let step_targets = all_reduce_scalars::<B::InnerBackend, C>(&[local_targets], comm, device)?[0].max(1.0);
        let (mut loss_value, mut lm_value, mut aux_value, mut step_tokens) = (0.0, 0.0, 0.0, 0.0);
        // Tokens routed to each expert of each layer this step (all ranks, padding excluded).
        let mut expert_load = vec![0.0f64; config.num_hidden_layers * num_experts];
        timers.mark("batch");
        let mut grads = if parallel.per_layer() {
            // FSDP, one unit gathered at a time (crate::layerwise); every rank runs every
            // micro-batch, an empty slice as one padding token.
            let mut grads = GradientsParams::new();
            let idle = Batch::idle();
            let scale = crate::layerwise::MicroScale {
                step_targets,
                micro_batches: micro.len(),
                aux_coef: model.router_aux_loss_coef,
                narrow_grads: keep_narrow,
            };
            for (m, batch) in micro.iter().enumerate() {
                step_tokens += batch.n_real_tokens() as f64;
                let batch = if batch.batch > 0 { batch } else { &idle };
                let dropout_seed = args.lora().map(|_| args.seed.wrapping_add(step as u64).wrapping_mul(1_000_003).wrapping_add(m as u64));
                let mut sample = || sample_memory(&mut mem_peak);
                let out = crate::layerwise::micro_step(&parallel, &model, batch, scale, comm, device, dropout_seed, &mut grads, &mut sample)?;
                for (acc, c) in expert_load.iter_mut().zip(&out.expert_counts) {
                    *acc += c;
                }
                (lm_value, aux_value, loss_value) = (lm_value + out.lm, aux_value + out.aux, loss_value + out.loss);
                timers.mark("forward and backward, per layer");
            }
            grads
        } else {
            let mut accumulator = GradientsAccumulator::<MixtralForCausalLM<B>>::new();
            // Sharded parameters gathered once per step; their gradients are reduce-scattered below.
            let live = parallel.materialize(&model)?;
            timers.mark("materialize");
            let idle = Batch::idle();
            for batch in &micro {
                step_tokens += batch.n_real_tokens() as f64;
                let batch = if batch.batch > 0 {
                    batch
                } else if parallel.lockstep() {
                    // Collectives inside the model: an empty slice still runs a forward and backward
                    // pass, on one padding token whose loss and statistics are exactly zero.
                    &idle
                } else {
                    // This rank's slice of a short last batch is empty; it still joins the collectives.
                    if world > 1 {
                        global_aux_share::<B, C>(&[], &[], num_experts, comm, device)?;
                    }
                    continue;
                };
                let out = plan_forward(&parallel, &live, batch, device)?;
                timers.mark("forward");
                let lm = out.lm_loss_sum.div_scalar(step_targets);
                // Each layer's counts read from the device once: for the load statistics and the
                // global load-balancing loss.
                let counts: Vec<Vec<f64>> = out
                    .aux
                    .iter()
                    .map(|stats| stats.token_counts.clone().into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default())
                    .collect();
                for (acc, c) in expert_load.iter_mut().zip(counts.concat()) {
                    *acc += c;
                }
                let aux = if world == 1 {
                    out.aux_loss
                } else {
                    global_aux_share::<B, C>(&out.aux, &counts, num_experts, comm, device)?
                }
                .div_scalar(micro.len() as f64);
                let loss = lm.clone() + aux.clone().mul_scalar(model.router_aux_loss_coef);
                lm_value += scalar(lm);
                aux_value += scalar(aux);
                loss_value += scalar(loss.clone());
                sample_memory(&mut mem_peak);
                timers.mark("loss and statistics reads");
                let grads = loss.backward();
                parallel.check()?;
                timers.mark("backward");
                let mut grads = GradientsParams::from_grads(grads, &live);
                if compute.is_some() {
                    // Accumulated and reduced in f32, as the masters.
                    crate::precision::widen_grads_where(&live, &mut grads, |id| parallel.widens_grad(id, keep_narrow));
                }
                accumulator.accumulate(&live, grads);
                timers.mark("gradients (widen, accumulate)");
            }
            drop(live);
            accumulator.grads()
        };
        parallel.sync_grads(&model, &mut grads)?;
        timers.mark("sync gradients");
        if world > 1 {
            let sums = all_reduce_scalars::<B::InnerBackend, C>(&[loss_value, lm_value, aux_value, step_tokens], comm, device)?;
            (loss_value, lm_value, aux_value, step_tokens) = (sums[0], sums[1], sums[2], sums[3]);
            expert_load = all_reduce_scalars::<B::InnerBackend, C>(&expert_load, comm, device)?;
        }
        tokens += step_tokens as u64;
        if !loss_value.is_finite() {
            progress.abandon();
            return Err(TrainError::NonFiniteLoss { step: step + 1, value: loss_value });
        }
        let grad_norm = parallel.grad_norm(&model, &grads, device)?;
        // Clipping rides in the optimizer's update pass (one f32 product per gradient, as a
        // separate scaling pass would round it).
        grad_scale.set(crate::sharding::clip_factor(grad_norm, args.clip_grad_norm()) as f32);
        timers.mark("grad norm");
        model = optimizer.step(lr, model, grads);
        sample_memory(&mut mem_peak);
        timers.mark("optimizer");

        let epoch_end = ends_epoch(step, accum, bpe);
        let eval_loss = match &eval_dataset {
            Some(eval) if due(args.evaluation_strategy, step, args.eval_interval(), epoch_end) => {
                let out = if world > 1 {
                    evaluate_parallel::<B, C>(&parallel, &model, eval, args.per_device_eval_batch_size, comm, device)?
                } else {
                    let full = match compute {
                        Some(c) => crate::precision::compute_copy(model.clone(), c, None),
                        None => model.clone(),
                    };
                    evaluate(&full.valid(), eval, args.per_device_eval_batch_size, device)
                };
                timers.mark("evaluation");
                if lead {
                    last_eval = Some(out.loss);
                    Some(out.loss)
                } else {
                    None
                }
            }
            _ => None,
        };
        let epoch = order.epoch_after((step + 1) * accum);

        progress.set_message(format!("loss {loss_value:.4} lr {lr:.2e}"));
        progress.inc(1);
        if (step + 1) % args.logging_steps == 0 || step + 1 == total_steps || eval_loss.is_some() {
            let mut line = StepMetrics::new((step + 1) as u64, loss_value, lr)
                .with("lm_loss", lm_value)
                .with("aux_loss", aux_value)
                .with("grad_norm", grad_norm)
                .with("elapsed_s", start.elapsed().as_secs_f64())
                .with_list("expert_load_min", per_layer(&expert_load, num_experts, f64::min))
                .with_list("expert_load_max", per_layer(&expert_load, num_experts, f64::max))
                .with("epoch", epoch);
            if let Some(e) = eval_loss {
                line = line.with("eval_loss", e);
            }
            metrics.log_step(&line)?;
        }
        timers.mark("eval and metrics");
        timers.report(step + 1);
        if due(args.save_strategy, step, args.save_steps, epoch_end) {
            let sharded = parallel.is_sharded();
            // Sharded runs gather the consolidated weights one tensor at a time, rank 0 writing
            // (never the whole model on a device), or skip it: their weights are in the per-rank
            // shards. LoRA adapters are small: they are gathered whole for PEFT's files.
            let consolidated = consolidated_staging_dir(&args.output_dir, step + 1);
            let adapters = if sharded && args.save_consolidated {
                if lead {
                    std::fs::create_dir_all(&consolidated).map_err(|source| CheckpointError::Io { path: consolidated.clone(), source })?;
                }
                parallel.save_consolidated(&model, &config, lead.then_some(consolidated.as_path()))?;
                match args.lora() {
                    Some(_) => Some(parallel.consolidate_trainable(&model)?),
                    None => None,
                }
            } else {
                None
            };
            if sharded {
                stage_rank_state::<B, _>(&args.output_dir, step + 1, rank, optimizer.to_record(), &param_ids::<B, _>(&model))?;
                let piece = |id: ParamId, dims: &[usize]| parallel.local_piece(id, dims);
                crate::rank_shards::stage_rank_shards::<B, _, _>(&args.output_dir, step + 1, rank, world, &parallel.describe(), &model, &piece)?;
                // Every rank's files are staged before rank 0 moves them into the checkpoint.
                comm.barrier()?;
            }
            if !lead {
                continue;
            }
            let state = TrainerState {
                global_step: step + 1,
                epoch,
                micro_batches_seen: (step + 1) * accum,
                seed: args.seed,
                scheduler_step: step + 1,
                max_steps: total_steps,
                global_batch_size: order.global_batch_size,
                gradient_accumulation_steps: accum,
                tokens_seen: tokens,
                last_eval_loss: last_eval,
                log_history: metrics.history(),
                param_ids: param_ids::<B, _>(&model).iter().map(ParamId::val).collect(),
                sharded: sharded.then(|| parallel.describe()),
                world_size: sharded.then_some(world),
            };
            // A sharded run's optimizer state is per rank, in `ranks/`.
            let record = if sharded { Default::default() } else { optimizer.to_record() };
            let staged = sharded.then(|| rank_staging_dir(&args.output_dir, step + 1));
            let weights = match (sharded, args.save_consolidated) {
                (false, _) => CheckpointWeights::Full(&model),
                (true, true) => CheckpointWeights::Streamed { dir: &consolidated, adapters: adapters.as_ref() },
                (true, false) => CheckpointWeights::ShardsOnly,
            };
            let dir = save_checkpoint::<B, _>(
                &args.output_dir,
                weights,
                &config,
                record,
                &state,
                source.tokenizer_json.as_deref(),
                staged.as_deref(),
                args.lora().map(|(targets, lora)| (lora, targets)).as_ref(),
            )?;
            tracing::info!("saved {}", dir.display());
            if let Some(limit) = args.save_total_limit {
                rotate_checkpoints(&args.output_dir, limit)?;
            }
        }
    }
    progress.finish();
    if let Some((targets, lora)) = args.lora() {
        // The adapters gathered whole; the frozen base stays sharded.
        let adapters = parallel.consolidate_trainable(&model)?;
        if lead {
            // The adapters in PEFT's format: the base model plus these files is the fine-tuned model.
            let n = mixtral_burn::save_peft_adapter(&adapters, &lora, targets, &args.output_dir)?;
            tracing::info!(tensors = n, "saved adapter_model.safetensors and adapter_config.json in {}", args.output_dir.display());
        }
        if args.merge_lora {
            let merged_dir = args.output_dir.join("merged");
            if parallel.is_sharded() {
                // Every rank gathers one base weight at a time, rank 0 folds the adapter in and writes.
                parallel.save_merged(&model, &adapters, &config, lead.then_some(merged_dir.as_path()))?;
            } else if lead {
                mixtral_burn::save_hf_classic(&adapters.merge_lora(), &config, &merged_dir, mixtral_burn::checkpoint::SaveDtype::F32)?;
            }
            if lead {
                tracing::info!("saved the merged model in {}", merged_dir.display());
            }
        }
    }
    let mut summary = metrics.summary(start.elapsed(), tokens, total_steps as u64);
    if let Some(peak) = mem_peak {
        // The largest of any rank, in MiB as the original reported.
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut local = [mib(peak.bytes_reserved), mib(peak.bytes_in_use)];
        if world > 1 {
            let t = Tensor::<B::InnerBackend, 1>::from_data(burn::tensor::TensorData::new(local.to_vec(), [2]), device);
            let all: Vec<f64> = comm.all_gather(t, 0)?.into_data().convert::<f64>().to_vec().unwrap_or_default();
            for pair in all.chunks(2) {
                local = [local[0].max(pair[0]), local[1].max(pair[1])];
            }
        }
        summary.gpu_mem_used_peak = Some(local[0]);
        summary.gpu_mem_alloc = Some(local[1]);
    }
    summary.eval_loss = last_eval;
    metrics.write_summary(&summary)?;
    tracing::info!(
        train_runtime = summary.train_runtime,
        train_loss = summary.train_loss,
        eval_loss = ?summary.eval_loss,
        tokens_per_second = summary.tokens_per_second,
        "done; metrics in {}",
        metrics.dir().display()
    );
    Ok(summary)
}

/// This rank's share of the load-balancing loss of the *global* batch:
/// `E · Σ_e (C_e / N) · (p_e / N)` with the token counts `C` and row count `N` summed over all
/// ranks (no gradient) and `p` this rank's router probabilities. The shares of all ranks add up to
/// the single-device loss, and each share's gradient is exactly that loss's gradient with respect
/// to this rank's router outputs.
/// `counts` are `aux`'s token counts, already read to the host.
fn global_aux_share<B, C>(
    aux: &[MoeAuxStats<B>],
    counts: &[Vec<f64>],
    num_experts: usize,
    comm: &C,
    device: &B::Device,
) -> Result<Tensor<B, 1>, CommError>
where
    B: AutodiffBackend,
    C: Communicator<B::InnerBackend>,
{
    let rows = aux.iter().map(|s| s.rows).sum();
    let global = crate::parallel::global_expert_counts::<B::InnerBackend, C>(counts, rows, num_experts, comm, device)?;
    let n = global[num_experts];
    let Some(probs) = aux.iter().map(|s| s.prob_sum.clone()).reduce(|a, b| a + b) else { return Ok(Tensor::zeros([1], device)) };
    if n == 0.0 {
        return Ok(Tensor::zeros([1], device));
    }
    let counts = Tensor::<B, 1>::from_data(
        burn::tensor::TensorData::new(global[..num_experts].iter().map(|&c| c as f32).collect::<Vec<_>>(), [num_experts]),
        device,
    );
    Ok((counts.div_scalar(n) * probs.div_scalar(n)).sum().mul_scalar(num_experts as f64))
}

/// One reduction (min or max) of each layer's per-expert values.
fn per_layer(values: &[f64], num_experts: usize, f: fn(f64, f64) -> f64) -> Vec<f64> {
    values.chunks(num_experts.max(1)).map(|c| c.iter().copied().reduce(f).unwrap_or(0.0)).collect()
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::ends_epoch;

    #[test]
    fn epoch_ends() {
        // 3 micro-batches per epoch, 2 per step: epochs end during steps 1 (micro 3), 2 (micro 6).
        let ends: Vec<bool> = (0..4).map(|s| ends_epoch(s, 2, 3)).collect();
        assert_eq!(ends, vec![false, true, true, false]);
        assert!((0..5).all(|s| ends_epoch(s, 1, 1)));
    }
}
