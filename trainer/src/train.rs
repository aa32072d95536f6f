//! The training loop: tiny (or given) Mixtral, AdamW, linear warm-up/decay, gradient accumulation
//! normalised by the global number of target tokens, global-norm gradient clipping, metrics files.

use std::time::Instant;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{Tensor, backend::AutodiffBackend};
use indicatif::{ProgressBar, ProgressStyle};
use mixtral_burn::{MixtralConfig, MixtralForCausalLM};

use crate::cli::Args;
use crate::data::{Batch, DataError, DataLoader, TrainDataset, load_records};
use crate::metrics::{MetricsError, MetricsWriter, StepMetrics, TrainSummary};
use crate::tokenizer::{ByteTokenizer, VOCAB_SIZE};

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
    /// The loss stopped being a finite number.
    #[error("loss became {value} at step {step}; lower --learning-rate or check the data")]
    NonFiniteLoss {
        /// Optimizer step.
        step: usize,
        /// The value.
        value: f64,
    },
}

/// HF's `get_linear_schedule_with_warmup`: linear warm-up to `lr`, then linear decay to zero at
/// `total` steps. `step` is the 0-based optimizer step about to be taken.
pub fn linear_schedule(lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return lr * step as f64 / warmup.max(1) as f64;
    }
    lr * ((total.saturating_sub(step)) as f64 / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
}

/// The model the trainer fine-tunes by default: [`MixtralConfig::tiny`], whose vocabulary matches the
/// byte-level tokenizer.
pub fn default_model_config(args: &Args) -> Result<MixtralConfig, TrainError> {
    let config = MixtralConfig::tiny().with_moe_kernel(args.moe_kernel);
    config.validate("tiny preset")?;
    assert_eq!(config.vocab_size, VOCAB_SIZE, "tiny preset and byte tokenizer disagree");
    Ok(config)
}

/// Runs the whole training job on `device` and writes `metrics.jsonl` and `train_summary.json`
/// into `--output-dir`.
///
/// # Errors
/// [`TrainError`] for unreadable data, unwritable outputs, or a diverging loss.
pub fn train<B: AutodiffBackend + burn_moe_backend::MoeBackend>(args: &Args, device: &B::Device) -> Result<TrainSummary, TrainError> {
    let tokenizer = ByteTokenizer::new();
    let records = load_records(args.data_path.as_deref())?;
    let dataset = TrainDataset::new(&records, args.prompt_template, args.max_seq_length, &tokenizer)?;
    let mut loader = DataLoader::new(&dataset, args.per_device_train_batch_size, args.seed)?;
    let total_steps = args.total_train_steps(loader.batches_per_epoch());

    let config = default_model_config(args)?;
    // Weights from a host RNG: the backend's RNG is process-global, so concurrent runs (tests,
    // in-process ranks) would otherwise draw each other's numbers.
    let mut model: MixtralForCausalLM<B> = config.init_seeded(device, args.seed);
    tracing::info!(
        parameters = model.num_parameters(),
        examples = dataset.len(),
        total_steps,
        moe_kernel = %args.moe_kernel,
        "training tiny Mixtral"
    );

    let mut optimizer = AdamWConfig::new()
        .with_beta_1(args.adam_beta1 as f32)
        .with_beta_2(args.adam_beta2 as f32)
        .with_epsilon(args.adam_epsilon as f32)
        .with_weight_decay(args.weight_decay as f32)
        .init::<B, MixtralForCausalLM<B>>();
    let mut metrics = MetricsWriter::create(&args.output_dir)?;

    let progress = ProgressBar::new(total_steps as u64);
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("static progress template"),
    );
    let start = Instant::now();
    let mut tokens = 0u64;
    for step in 0..total_steps {
        let lr = linear_schedule(args.learning_rate, step, args.warmup_steps, total_steps);
        let micro: Vec<Batch> = loader.by_ref().take(args.gradient_accumulation_steps).collect();
        // Every micro-batch's token losses are divided by the target tokens of the whole step, so the
        // accumulated gradient is that of one big batch however it is split.
        let step_targets: usize = micro.iter().map(|b| b.n_target_tokens).sum::<usize>().max(1);
        let mut accumulator = GradientsAccumulator::<MixtralForCausalLM<B>>::new();
        let (mut loss_value, mut lm_value, mut aux_value) = (0.0, 0.0, 0.0);
        for batch in &micro {
            tokens += batch.n_real_tokens() as u64;
            let real = batch.real_tokens();
            let out = model.forward_with_labels_masked(
                batch.input_ids_tensor::<B>(device),
                batch.labels_tensor::<B>(device),
                Some(&real),
            );
            let lm = out.lm_loss_sum.div_scalar(step_targets as f64);
            let aux = out.aux_loss.div_scalar(micro.len() as f64);
            let loss = lm.clone() + aux.clone().mul_scalar(model.router_aux_loss_coef);
            lm_value += scalar(lm);
            aux_value += scalar(aux);
            loss_value += scalar(loss.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        if !loss_value.is_finite() {
            progress.abandon();
            return Err(TrainError::NonFiniteLoss { step: step + 1, value: loss_value });
        }
        let mut grads = accumulator.grads();
        let grad_norm = clip_global_norm::<B, _>(&model, &mut grads, args.clip_grad_norm());
        model = optimizer.step(lr, model, grads);

        progress.set_message(format!("loss {loss_value:.4} lr {lr:.2e}"));
        progress.inc(1);
        if (step + 1) % args.logging_steps == 0 || step + 1 == total_steps {
            metrics.log_step(
                &StepMetrics::new((step + 1) as u64, loss_value, lr)
                    .with("lm_loss", lm_value)
                    .with("aux_loss", aux_value)
                    .with("grad_norm", grad_norm)
                    .with("epoch", loader.epoch() as f64),
            )?;
        }
    }
    progress.finish();
    let summary = metrics.summary(start.elapsed(), tokens, total_steps as u64);
    metrics.write_summary(&summary)?;
    tracing::info!(
        train_runtime = summary.train_runtime,
        train_loss = summary.train_loss,
        tokens_per_second = summary.tokens_per_second,
        "done; metrics in {}",
        metrics.dir().display()
    );
    Ok(summary)
}

fn scalar<B: AutodiffBackend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

/// Global L2 norm of all gradients (as HF's `clip_grad_norm_`), scaling them down to `max_norm`
/// when it is exceeded. Burn's own clipping works per tensor, which is a different update.
/// Returns the norm before clipping.
fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: Option<f64>,
) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.total += g.powi_scalar(2).sum().into_data().iter::<f64>().next().unwrap_or(0.0);
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let id: ParamId = param.id;
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(id) {
                self.grads.register::<B::InnerBackend, D>(id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut sum = SumSquares { grads, total: 0.0 };
    model.visit(&mut sum);
    let norm = sum.total.sqrt();
    if let Some(max) = max_norm
        && norm > max
    {
        model.visit(&mut Scale { grads, factor: max / (norm + 1e-6) });
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::linear_schedule;

    #[test]
    fn linear_schedule_warms_up_then_decays_to_zero() {
        assert_eq!(linear_schedule(1.0, 0, 2, 10), 0.0);
        assert_eq!(linear_schedule(1.0, 1, 2, 10), 0.5);
        assert_eq!(linear_schedule(1.0, 2, 2, 10), 1.0);
        assert_eq!(linear_schedule(1.0, 6, 2, 10), 0.5);
        assert_eq!(linear_schedule(1.0, 10, 2, 10), 0.0);
        assert_eq!(linear_schedule(2.0, 0, 0, 4), 2.0);
    }
}
