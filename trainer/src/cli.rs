//! Command-line arguments, named after Hugging Face `TrainingArguments` (kebab-case) so that
//! commands carry over from `transformers` scripts. Unknown flags are rejected by clap.

use std::path::PathBuf;

use clap::Parser;

use crate::data::PromptStyle;
use crate::schedule::LrSchedulerType;

/// Fine-tune a Mixtral-style MoE model on alpaca-style instruction data.
#[derive(Debug, Clone, PartialEq, Parser, serde::Serialize)]
#[command(name = "trainer", version, about)]
pub struct Args {
    /// Directory for metrics.jsonl, train_summary.json and checkpoints (created if missing).
    #[arg(long, default_value = "results")]
    pub output_dir: PathBuf,

    /// Alpaca-style dataset: a JSON array or a JSON Lines file of objects with `instruction`,
    /// optional `input`, and `output`. Defaults to the bundled tiny dataset.
    #[arg(long)]
    pub data_path: Option<PathBuf>,

    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 3e-3, value_parser = non_negative_f64)]
    pub learning_rate: f64,

    /// Number of passes over the data; fractional values stop mid-epoch. Used only when
    /// --max-steps is -1.
    #[arg(long, default_value_t = 1.0, value_parser = positive_f64)]
    pub num_train_epochs: f64,

    /// Number of optimizer steps; -1 derives it from --num-train-epochs.
    #[arg(long, default_value_t = 60, allow_negative_numbers = true, value_parser = max_steps)]
    pub max_steps: i64,

    /// Examples per forward/backward pass.
    #[arg(long, default_value_t = 8, value_parser = positive_usize)]
    pub per_device_train_batch_size: usize,

    /// Batches whose gradients are accumulated into one optimizer step.
    #[arg(long, default_value_t = 1, value_parser = positive_usize)]
    pub gradient_accumulation_steps: usize,

    /// Seed for weight initialisation and data shuffling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Log (and append to metrics.jsonl) every N optimizer steps.
    #[arg(long, default_value_t = 1, value_parser = positive_usize)]
    pub logging_steps: usize,

    /// Where logged steps go besides metrics.jsonl: `tensorboard` writes scalar event files to
    /// OUTPUT_DIR/runs (view with `tensorboard --logdir OUTPUT_DIR/runs`).
    #[arg(long, value_enum, default_value_t = ReportTo::None)]
    pub report_to: ReportTo,

    /// Examples longer than this many tokens are truncated (and counted in the log).
    #[arg(long, default_value_t = 128, value_parser = max_seq_length)]
    pub max_seq_length: usize,

    /// Prompt template: `compact` suits the tiny bundled model; `alpaca` is the Stanford
    /// Alpaca template (about 190 bytes of boilerplate: raise --max-seq-length with it).
    #[arg(long, value_enum, default_value_t = PromptStyle::Compact)]
    pub prompt_template: PromptStyle,

    /// Decoupled (AdamW) weight decay.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    pub weight_decay: f64,

    /// Optimizer steps of linear warmup from 0 to --learning-rate; when > 0 it overrides
    /// --warmup-ratio (as in HF).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,

    /// Adam beta1.
    #[arg(long, default_value_t = 0.9, value_parser = adam_beta)]
    pub adam_beta1: f64,

    /// Adam beta2.
    #[arg(long, default_value_t = 0.999, value_parser = adam_beta)]
    pub adam_beta2: f64,

    /// Adam epsilon.
    #[arg(long, default_value_t = 1e-8, value_parser = positive_f64)]
    pub adam_epsilon: f64,

    /// Clip the global gradient L2 norm to this value; 0 disables clipping (as in HF).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f64)]
    pub max_grad_norm: f64,

    /// Where the model runs: `ndarray` (CPU) or `cuda` (needs the `cuda` cargo feature).
    #[arg(long, value_enum, default_value_t = Device::Ndarray)]
    pub device: Device,

    /// Compute precision: `f32`, or `bf16` / `f16` with f32 master weights and AdamW state (frozen
    /// LoRA base weights are stored in the compute dtype). Alias `--torch-dtype`; `bfloat16`,
    /// `float16`, `float32` are accepted.
    #[arg(long, alias = "torch-dtype", value_enum, default_value_t = crate::precision::Dtype::F32)]
    pub dtype: crate::precision::Dtype,

    /// Recompute activations in the backward pass instead of keeping them, one decoder layer at a
    /// time (HF's `gradient_checkpointing`): the forward pass keeps each layer's input only, the
    /// backward pass runs each layer again with its graph. One layer's activations alive at a time,
    /// one more forward pass per step. Any plan; not with `--fsdp-gather step`.
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// AdamW's update as one fused pass per parameter on CubeCL backends (CUDA, wgpu) instead of
    /// burn-optim's dozen elementwise ops — the same algorithm and checkpoint state (tested against
    /// burn-optim). On by default (an H200 step of a 2-layer Mixtral-shaped model: optimizer 25 ms
    /// instead of about 75); `--fused-adamw false` runs burn-optim's.
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub fused_adamw: bool,

    /// How attention is computed: eager (HF's: the full score matrix per head is materialised and
    /// kept for the backward pass) or chunked (blocks of queries; the backward pass recomputes the
    /// scores from a per-query log-sum-exp, so a layer keeps O(seq) per head instead of O(seq²)).
    /// Same numbers up to rounding. Default chunked: on an H200 it made a 2-layer Mixtral-shaped
    /// step 20% faster with 18% less live memory (BENCHMARKS.md).
    #[arg(long, default_value = "chunked")]
    pub attention: mixtral_burn::AttentionKernel,

    /// Expert-computation path of the MoE layers: reference, scatter (alias scattermoe) or
    /// block-sparse (alias megablocks).
    #[arg(long, default_value = "reference")]
    pub moe_kernel: burn_moe_backend::MoeKernel,

    /// Library for the scatter kernel's expert GEMMs on CUDA: cubecl (our kernels, the default: on a
    /// Hopper GPU the wgmma + TMA one, elsewhere — or with BURN_MOE_WGMMA=0 — the CubeCL tensor-core
    /// kernels) or cublas (cuBLAS per expert segment; libcublas on the library path).
    /// Takes effect where the scatter ops run unfused: `--device cuda` with `--dtype bf16|f16`.
    #[arg(long, default_value = "cubecl")]
    pub grouped_gemm: burn_moe_backend::GroupedGemm,

    /// The original's switch: `--use-scattermoe` or `--use-scattermoe true` means
    /// `--moe-kernel scatter` (`false` leaves --moe-kernel as given).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub use_scattermoe: Option<bool>,

    // ---- Model and data ----
    /// HF Mixtral directory to fine-tune: config.json, safetensors weights (classic or fused
    /// layout) and tokenizer.json. Without it, the tiny preset with the byte-level tokenizer.
    #[arg(long, help_heading = "Model and data")]
    pub model_path: Option<PathBuf>,

    /// An HF `config.json` describing a randomly initialised model to train instead of the tiny
    /// preset (benchmarks at real shapes, e.g. Mixtral-8x7B with fewer layers), with the byte-level
    /// tokenizer (its ids are valid for any `vocab_size` ≥ 259). Weights come from the host RNG on the
    /// CPU (the same for any rank count) and from the device RNG, broadcast from rank 0, on the GPU.
    /// Conflicts with --model-path.
    #[arg(long, conflicts_with = "model_path", help_heading = "Model and data")]
    pub model_config: Option<PathBuf>,

    /// Concatenate tokenized examples (each BOS ... EOS) into rows of exactly --max-seq-length
    /// tokens. Attention is causal over the whole row: an example can attend to earlier examples
    /// in its row (HF's simple packing); prompts stay masked out of the loss.
    #[arg(long, help_heading = "Model and data")]
    pub packing: bool,

    // ---- Schedule ----
    /// Learning-rate schedule after warm-up: linear decay to 0, cosine decay to 0, constant, or
    /// constant_with_warmup.
    #[arg(long, value_enum, default_value_t = LrSchedulerType::Linear, help_heading = "Schedule")]
    pub lr_scheduler_type: LrSchedulerType,

    /// Fraction of the total steps used for warm-up (rounded up), when --warmup-steps is 0.
    #[arg(long, default_value_t = 0.0, value_parser = unit_interval, help_heading = "Schedule")]
    pub warmup_ratio: f64,

    // ---- Evaluation ----
    /// Alpaca-style evaluation set (same formats as --data-path).
    #[arg(long, help_heading = "Evaluation")]
    pub eval_data_path: Option<PathBuf>,

    /// When to compute the evaluation loss: never, every --eval-steps steps, or at each epoch end.
    #[arg(long, value_enum, default_value_t = IntervalStrategy::No, help_heading = "Evaluation")]
    pub evaluation_strategy: IntervalStrategy,

    /// Evaluation interval in optimizer steps for `--evaluation-strategy steps`; defaults to
    /// --logging-steps (as in HF).
    #[arg(long, value_parser = positive_usize, help_heading = "Evaluation")]
    pub eval_steps: Option<usize>,

    /// Examples per evaluation forward pass.
    #[arg(long, default_value_t = 8, value_parser = positive_usize, help_heading = "Evaluation")]
    pub per_device_eval_batch_size: usize,

    // ---- Checkpoints ----
    /// When to write `OUTPUT_DIR/checkpoint-<step>/`: never, every --save-steps steps, or at each
    /// epoch end.
    #[arg(long, value_enum, default_value_t = IntervalStrategy::No, help_heading = "Checkpoints")]
    pub save_strategy: IntervalStrategy,

    /// Checkpoint interval in optimizer steps for `--save-strategy steps`.
    #[arg(long, default_value_t = 500, value_parser = positive_usize, help_heading = "Checkpoints")]
    pub save_steps: usize,

    /// Keep at most this many checkpoints in --output-dir, deleting the oldest.
    #[arg(long, value_parser = positive_usize, help_heading = "Checkpoints")]
    pub save_total_limit: Option<usize>,

    /// Continue from a checkpoint directory, or `latest` for the newest `checkpoint-<step>` in
    /// --output-dir. The other flags must match the interrupted run.
    #[arg(long, help_heading = "Checkpoints")]
    pub resume_from_checkpoint: Option<String>,

    /// Sharded runs (FSDP1, FSDP2, EP): also write the consolidated `model.safetensors` (HF
    /// layout, gathered one tensor at a time and streamed to disk by rank 0) next to the per-rank
    /// weight shards. `false` skips it; resume then reads the shards (same plan and rank count).
    /// Unsharded runs always write `model.safetensors`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false", help_heading = "Checkpoints")]
    pub save_consolidated: bool,

    // ---- LoRA ----
    /// Train low-rank adapters instead of the full model: `attn-only` adapts q/k/v/o_proj, `all`
    /// also every expert's w1/w2/w3 (the router is never adapted). Base weights are frozen: the
    /// optimizer keeps no state for them.
    #[arg(long, value_enum, default_value_t = UseLora::None, help_heading = "LoRA")]
    pub use_lora: UseLora,

    /// Adapter rank r.
    #[arg(long, default_value_t = 16, value_parser = positive_usize, help_heading = "LoRA")]
    pub lora_r: usize,

    /// Adapter scale numerator: deltas are multiplied by alpha / r.
    #[arg(long, default_value_t = 32.0, value_parser = positive_f64, help_heading = "LoRA")]
    pub lora_alpha: f64,

    /// Dropout on the adapter input during training (as PEFT), drawn from the backend RNG
    /// seeded with --seed.
    #[arg(long, default_value_t = 0.05, value_parser = adam_beta, help_heading = "LoRA")]
    pub lora_dropout: f64,

    /// With --use-lora: also write the adapters folded into the base weights (`W + alpha/r · B·A`)
    /// as an HF checkpoint in OUTPUT_DIR/merged/ at the end of training.
    #[arg(long, help_heading = "LoRA")]
    pub merge_lora: bool,

    // ---- Distributed ----
    /// Data-parallel workers on this node. With `--device cuda`, one process per GPU (this binary
    /// re-executed with torchrun's variables; it also runs unchanged under `torchrun`/`srun`).
    /// With `--device ndarray`, in-process ranks (threads) with in-process collectives.
    #[arg(long, default_value_t = 1, value_parser = positive_usize, help_heading = "Distributed")]
    pub nproc_per_node: usize,

    /// Machines in the job (`--device cuda` only).
    #[arg(long, default_value_t = 1, value_parser = positive_usize, help_heading = "Distributed")]
    pub nnodes: usize,

    /// This machine's index, `0..--nnodes`.
    #[arg(long, default_value_t = 0, help_heading = "Distributed")]
    pub node_rank: usize,

    /// Address of node 0 as the other nodes reach it.
    #[arg(long, default_value = "127.0.0.1", help_heading = "Distributed")]
    pub master_addr: String,

    /// Rendezvous port on --master-addr.
    #[arg(long, default_value_t = 29500, help_heading = "Distributed")]
    pub master_port: u16,

    /// Seconds a collective may wait for the other ranks before failing with an error naming the
    /// collective and group (a dead or stuck rank never hangs the others forever).
    #[arg(long, default_value_t = 600.0, value_parser = positive_f64, help_heading = "Distributed")]
    pub collective_timeout: f64,

    /// Expert-parallel degree: each rank of an EP group holds `num_experts / ep_size` experts whole
    /// and tokens reach them by all-to-all. Must divide the world size and the number of experts;
    /// `dp_size = world / ep_size`.
    #[arg(long, default_value_t = 1, value_parser = positive_usize, help_heading = "Distributed")]
    pub ep_size: usize,

    /// How the non-expert parameters are distributed: `fsdp2` shards every one (`Shard(0)` over all
    /// ranks; experts too without EP), `ddp`/`none` replicate them and all-reduce gradients.
    #[arg(long, value_enum, default_value_t = crate::sharding::Sharding::Ddp, help_heading = "Distributed")]
    pub sharding: crate::sharding::Sharding,

    /// When FSDP (`fsdp1`/`fsdp2`) gathers the sharded parameters: `layer` gathers each unit (a
    /// decoder layer, the embedding, the head) just before it runs and frees it after, in the
    /// forward pass and again in the backward pass (which re-runs the layer's forward: at most one
    /// layer is ever whole); `step` gathers the whole model once per optimizer step and keeps it
    /// until the step's last backward pass (no recomputation, the whole model's memory);
    /// `prefetch` is `layer` with each unit's gathers queued while the unit before it computes and
    /// each unit's gradient reduce-scatters left running during the next unit's backward pass
    /// (overlapped on NCCL; two units whole at a time); `auto` (the default) is `step` with
    /// `--ep-size` > 1 (FSDP then gathers only the small non-expert weights) and `prefetch` otherwise.
    #[arg(long, value_enum, default_value_t = crate::sharding::FsdpGather::Auto, help_heading = "Distributed")]
    pub fsdp_gather: crate::sharding::FsdpGather,

    /// The original's switch for expert parallelism: `--ep-size <world size>` unless `--ep-size` is
    /// given.
    #[arg(long, help_heading = "Distributed")]
    pub use_megablocks_sharding: bool,
}

impl Args {
    /// The MoE kernel of the run (`--moe-kernel`, overridden by `--use-scattermoe true`).
    #[must_use]
    pub fn kernel(&self) -> burn_moe_backend::MoeKernel {
        if self.use_scattermoe == Some(true) { burn_moe_backend::MoeKernel::Scatter } else { self.moe_kernel }
    }

    /// The EP degree for a world of `world_size` ranks (`--ep-size`, or the whole world with
    /// `--use-megablocks-sharding`).
    #[must_use]
    pub fn effective_ep_size(&self, world_size: usize) -> usize {
        if self.ep_size > 1 || !self.use_megablocks_sharding { self.ep_size } else { world_size }
    }
}

impl Args {
    /// The launcher settings of this command line.
    pub fn launch_config(&self) -> crate::launch::LaunchConfig {
        crate::launch::LaunchConfig {
            nproc_per_node: self.nproc_per_node,
            nnodes: self.nnodes,
            node_rank: self.node_rank,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
        }
    }
}

/// Which projections get LoRA adapters (`--use-lora`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UseLora {
    /// Full fine-tuning, no adapters.
    #[default]
    None,
    /// q_proj, k_proj, v_proj, o_proj.
    AttnOnly,
    /// The attention projections and the experts' w1, w2, w3.
    All,
}

impl Args {
    /// The adapter targets and hyper-parameters, `None` without `--use-lora`.
    #[must_use]
    pub fn lora(&self) -> Option<(mixtral_burn::LoraTargets, mixtral_burn::LoraConfig)> {
        let targets = match self.use_lora {
            UseLora::None => return None,
            UseLora::AttnOnly => mixtral_burn::LoraTargets::AttnOnly,
            UseLora::All => mixtral_burn::LoraTargets::All,
        };
        let config = mixtral_burn::LoraConfig::new().with_r(self.lora_r).with_alpha(self.lora_alpha).with_dropout(self.lora_dropout);
        Some((targets, config))
    }
}

/// `--report-to`: loggers besides `metrics.jsonl`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// `metrics.jsonl` only.
    #[default]
    None,
    /// TensorBoard event files in `OUTPUT_DIR/runs`.
    Tensorboard,
}

/// HF's `IntervalStrategy`, for evaluation and saving.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IntervalStrategy {
    /// Never.
    #[default]
    No,
    /// Every N optimizer steps.
    Steps,
    /// At the end of every epoch.
    Epoch,
}

/// Compute device of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Device {
    /// burn-ndarray on the CPU.
    Ndarray,
    /// burn-cuda on GPU 0 (build with `--features cuda`).
    Cuda,
}

impl Args {
    /// `--max-steps` when it overrides the epoch count, `None` when it is -1.
    #[must_use]
    pub fn max_steps_override(&self) -> Option<usize> {
        usize::try_from(self.max_steps).ok().filter(|&s| s > 0)
    }

    /// Examples per optimizer step.
    #[must_use]
    pub fn effective_batch_size(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps
    }

    /// Number of optimizer steps to run, given the data loader's batches per epoch.
    ///
    /// With `--max-steps -1` this is HF Trainer's rule:
    /// `ceil(num_train_epochs * max(batches_per_epoch / gradient_accumulation_steps, 1))`
    /// (integer division: a trailing partial accumulation does not count as a step).
    #[must_use]
    pub fn total_train_steps(&self, batches_per_epoch: usize) -> usize {
        if let Some(steps) = self.max_steps_override() {
            return steps;
        }
        let updates_per_epoch = (batches_per_epoch / self.gradient_accumulation_steps).max(1);
        // Both factors are small positive numbers; the product is exact enough in f64.
        (self.num_train_epochs * updates_per_epoch as f64).ceil() as usize
    }

    /// Evaluation interval in steps (`--eval-steps`, else `--logging-steps`).
    #[must_use]
    pub fn eval_interval(&self) -> usize {
        self.eval_steps.unwrap_or(self.logging_steps)
    }

    /// Whether gradient clipping is enabled (`--max-grad-norm` > 0).
    #[must_use]
    pub fn clip_grad_norm(&self) -> Option<f64> {
        (self.max_grad_norm > 0.0).then_some(self.max_grad_norm)
    }
}

fn parse_finite(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("`{s}` is not a finite number"))
    }
}

fn positive_f64(s: &str) -> Result<f64, String> {
    let v = parse_finite(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be > 0, got {v}"))
    }
}

fn non_negative_f64(s: &str) -> Result<f64, String> {
    let v = parse_finite(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be >= 0, got {v}"))
    }
}

fn adam_beta(s: &str) -> Result<f64, String> {
    let v = parse_finite(s)?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1), got {v}"))
    }
}

fn unit_interval(s: &str) -> Result<f64, String> {
    let v = parse_finite(s)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be in [0, 1], got {v}"))
    }
}

fn positive_usize(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not a positive integer: {e}"))?;
    if v > 0 {
        Ok(v)
    } else {
        Err("must be at least 1".to_owned())
    }
}

fn max_seq_length(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not a positive integer: {e}"))?;
    // BOS plus at least one target token.
    if v >= 2 {
        Ok(v)
    } else {
        Err(format!("must be at least 2, got {v}"))
    }
}

fn max_steps(s: &str) -> Result<i64, String> {
    let v: i64 = s
        .trim()
        .parse()
        .map_err(|e| format!("`{s}` is not an integer: {e}"))?;
    // 0 and other negatives are rejected rather than guessed at: HF treats them as "use
    // epochs", which silently hides typos.
    if v == -1 || v > 0 {
        Ok(v)
    } else {
        Err(format!(
            "must be -1 (use --num-train-epochs) or a positive step count, got {v}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("trainer").chain(args.iter().copied()))
    }

    #[test]
    fn command_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn original_switches_map_to_our_flags() {
        use burn_moe_backend::MoeKernel;
        assert_eq!(parse(&[]).unwrap().kernel(), MoeKernel::Reference);
        assert_eq!(parse(&["--use-scattermoe"]).unwrap().kernel(), MoeKernel::Scatter);
        assert_eq!(parse(&["--use-scattermoe", "true"]).unwrap().kernel(), MoeKernel::Scatter);
        let a = parse(&["--use-scattermoe", "false", "--moe-kernel", "megablocks"]).unwrap();
        assert_eq!(a.kernel(), MoeKernel::BlockSparse);
        assert_eq!(parse(&["--use-megablocks-sharding"]).unwrap().effective_ep_size(8), 8);
        assert_eq!(parse(&["--use-megablocks-sharding", "--ep-size", "4"]).unwrap().effective_ep_size(8), 4);
        assert_eq!(parse(&[]).unwrap().effective_ep_size(8), 1);
        assert_eq!(parse(&["--sharding", "fsdp1"]).unwrap().sharding, crate::sharding::Sharding::Fsdp1);
        assert!(parse(&["--sharding", "zero3"]).is_err());
        use crate::sharding::FsdpGather;
        assert_eq!(parse(&[]).unwrap().fsdp_gather, FsdpGather::Auto);
        assert_eq!(parse(&["--fsdp-gather", "auto"]).unwrap().fsdp_gather, FsdpGather::Auto);
        assert_eq!(parse(&["--fsdp-gather", "layer"]).unwrap().fsdp_gather, FsdpGather::Layer);
        assert_eq!(parse(&["--fsdp-gather", "step"]).unwrap().fsdp_gather, FsdpGather::Step);
        assert_eq!(parse(&["--fsdp-gather", "prefetch"]).unwrap().fsdp_gather, FsdpGather::Prefetch);
        assert!(parse(&["--fsdp-gather", "param"]).is_err());
        use crate::precision::Dtype;
        assert_eq!(parse(&[]).unwrap().dtype, Dtype::F32);
        assert_eq!(parse(&["--torch-dtype", "bfloat16"]).unwrap().dtype, Dtype::Bf16);
        assert_eq!(parse(&["--dtype", "f16"]).unwrap().dtype, Dtype::F16);
        assert!(parse(&["--dtype", "fp8"]).is_err());
        assert!(!parse(&[]).unwrap().gradient_checkpointing);
        assert!(parse(&["--gradient-checkpointing"]).unwrap().gradient_checkpointing);
        assert!(parse(&[]).unwrap().fused_adamw && parse(&["--fused-adamw"]).unwrap().fused_adamw);
        assert!(!parse(&["--fused-adamw", "false"]).unwrap().fused_adamw);
        assert_eq!(parse(&[]).unwrap().attention, mixtral_burn::AttentionKernel::Chunked);
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.output_dir, PathBuf::from("results"));
        assert_eq!(a.data_path, None);
        assert_eq!(a.learning_rate, 3e-3);
        assert_eq!(a.num_train_epochs, 1.0);
        assert_eq!(a.max_steps, 60);
        assert_eq!(a.per_device_train_batch_size, 8);
        assert_eq!(a.gradient_accumulation_steps, 1);
        assert_eq!(a.seed, 42);
        assert_eq!(a.logging_steps, 1);
        assert_eq!(a.max_seq_length, 128);
        assert_eq!(a.prompt_template, PromptStyle::Compact);
        assert_eq!(a.weight_decay, 0.0);
        assert_eq!(a.warmup_steps, 0);
        assert_eq!(a.adam_beta1, 0.9);
        assert_eq!(a.adam_beta2, 0.999);
        assert_eq!(a.adam_epsilon, 1e-8);
        assert_eq!(a.max_grad_norm, 1.0);
        assert_eq!(a.max_steps_override(), Some(60));
        assert_eq!(a.clip_grad_norm(), Some(1.0));
        assert_eq!(a.model_path, None);
        assert!(!a.packing);
        assert_eq!(a.lr_scheduler_type, LrSchedulerType::Linear);
        assert_eq!(a.warmup_ratio, 0.0);
        assert_eq!(a.evaluation_strategy, IntervalStrategy::No);
        assert_eq!(a.eval_interval(), 1);
        assert_eq!(a.per_device_eval_batch_size, 8);
        assert_eq!(a.save_strategy, IntervalStrategy::No);
        assert_eq!(a.save_steps, 500);
        assert_eq!(a.save_total_limit, None);
        assert_eq!(a.resume_from_checkpoint, None);
        assert!(a.save_consolidated);
        assert_eq!(a.use_lora, UseLora::None);
        assert_eq!((a.lora_r, a.lora_alpha, a.lora_dropout), (16, 32.0, 0.05));
        assert!(a.lora().is_none());
    }

    #[test]
    fn lora_flags() {
        let a = parse(&["--use-lora", "all", "--lora-r", "8", "--lora-alpha", "4", "--lora-dropout", "0"]).unwrap();
        let (targets, config) = a.lora().unwrap();
        assert_eq!(targets, mixtral_burn::LoraTargets::All);
        assert_eq!((config.r, config.alpha, config.dropout), (8, 4.0, 0.0));
        assert_eq!(parse(&["--use-lora", "attn-only"]).unwrap().lora().unwrap().0, mixtral_burn::LoraTargets::AttnOnly);
        assert!(parse(&["--use-lora", "mlp"]).is_err());
        assert!(parse(&["--lora-r", "0"]).is_err());
        assert!(parse(&["--lora-dropout", "1"]).is_err());
    }

    #[test]
    fn eval_schedule_and_checkpoint_flags() {
        let a = parse(&[
            "--model-path", "m", "--packing", "--lr-scheduler-type", "constant_with_warmup", "--warmup-ratio", "0.1",
            "--eval-data-path", "e.json", "--evaluation-strategy", "steps", "--eval-steps", "3",
            "--per-device-eval-batch-size", "2", "--save-strategy", "epoch", "--save-steps", "4",
            "--save-total-limit", "2", "--resume-from-checkpoint", "latest",
        ])
        .unwrap();
        assert_eq!(a.model_path, Some(PathBuf::from("m")));
        assert!(a.packing);
        assert_eq!(a.lr_scheduler_type, LrSchedulerType::ConstantWithWarmup);
        assert_eq!(a.warmup_ratio, 0.1);
        assert_eq!(a.eval_data_path, Some(PathBuf::from("e.json")));
        assert_eq!(a.evaluation_strategy, IntervalStrategy::Steps);
        assert_eq!(a.eval_interval(), 3);
        assert_eq!(a.per_device_eval_batch_size, 2);
        assert_eq!(a.save_strategy, IntervalStrategy::Epoch);
        assert_eq!(a.save_steps, 4);
        assert_eq!(a.save_total_limit, Some(2));
        assert_eq!(a.resume_from_checkpoint.as_deref(), Some("latest"));
        assert!(!parse(&["--save-consolidated", "false"]).unwrap().save_consolidated);
        assert!(parse(&["--save-consolidated", "true"]).unwrap().save_consolidated);
        assert!(parse(&["--save-consolidated", "maybe"]).is_err());
        assert_eq!(parse(&["--lr-scheduler-type", "cosine"]).unwrap().lr_scheduler_type, LrSchedulerType::Cosine);
        assert_eq!(parse(&["--lr-scheduler-type", "constant"]).unwrap().lr_scheduler_type, LrSchedulerType::Constant);
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "--output-dir",
            "out/run1",
            "--data-path=my.jsonl",
            "--learning-rate",
            "1e-4",
            "--max-steps",
            "-1",
            "--num-train-epochs",
            "2.5",
            "--per-device-train-batch-size",
            "4",
            "--gradient-accumulation-steps",
            "2",
            "--seed",
            "7",
            "--prompt-template",
            "alpaca",
            "--max-seq-length",
            "512",
            "--max-grad-norm",
            "0",
            "--warmup-steps",
            "5",
        ])
        .unwrap();
        assert_eq!(a.output_dir, PathBuf::from("out/run1"));
        assert_eq!(a.data_path, Some(PathBuf::from("my.jsonl")));
        assert_eq!(a.learning_rate, 1e-4);
        assert_eq!(a.max_steps, -1);
        assert_eq!(a.max_steps_override(), None);
        assert_eq!(a.num_train_epochs, 2.5);
        assert_eq!(a.effective_batch_size(), 8);
        assert_eq!(a.seed, 7);
        assert_eq!(a.prompt_template, PromptStyle::Alpaca);
        assert_eq!(a.max_seq_length, 512);
        assert_eq!(a.clip_grad_norm(), None);
        assert_eq!(a.warmup_steps, 5);
        // 25 batches / 2 accumulation = 12 updates per epoch; ceil(2.5 * 12) = 30.
        assert_eq!(a.total_train_steps(25), 30);
        // Fewer batches than accumulation steps still give one update per epoch.
        assert_eq!(a.total_train_steps(1), 3);
    }

    #[test]
    fn max_steps_overrides_epochs() {
        let a = parse(&["--max-steps", "7", "--num-train-epochs", "100"]).unwrap();
        assert_eq!(a.total_train_steps(1000), 7);
    }

    #[test]
    fn unknown_flag_is_an_error() {
        let err = parse(&["--bf16"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
        let err = parse(&["--learning_rate", "1e-3"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn invalid_values_are_errors() {
        for bad in [
            &["--per-device-train-batch-size", "0"][..],
            &["--gradient-accumulation-steps", "0"],
            &["--logging-steps", "0"],
            &["--max-steps", "0"],
            &["--max-steps", "-2"],
            &["--max-seq-length", "1"],
            &["--learning-rate", "-1"],
            &["--learning-rate", "nan"],
            &["--num-train-epochs", "0"],
            &["--adam-beta1", "1.0"],
            &["--adam-epsilon", "0"],
            &["--prompt-template", "chatml"],
            &["--seed", "-3"],
            &["--warmup-ratio", "1.5"],
            &["--lr-scheduler-type", "polynomial"],
            &["--evaluation-strategy", "always"],
            &["--save-steps", "0"],
            &["--save-total-limit", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
