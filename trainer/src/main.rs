//! `cargo run -p trainer`: fine-tunes Mixtral on alpaca-style data. With no arguments it trains the
//! tiny preset on the bundled dataset on the CPU and writes `results/metrics.jsonl` and
//! `results/train_summary.json`.

use anyhow::Context;
use clap::Parser;
use trainer::Args;
use trainer::cli::Device;
use trainer::train::train;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let summary = match args.device {
        Device::Ndarray => {
            type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
            train::<B>(&args, &Default::default()).context("training failed")?
        }
        Device::Cuda => run_cuda(&args)?,
    };
    println!(
        "train_runtime {:.2} s, train_loss {:.4}, {:.0} tokens/s; metrics in {}",
        summary.train_runtime,
        summary.train_loss,
        summary.tokens_per_second,
        args.output_dir.display()
    );
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &Args) -> anyhow::Result<trainer::TrainSummary> {
    type B = burn::backend::Autodiff<burn::backend::Cuda<f32>>;
    train::<B>(args, &burn::backend::cuda::CudaDevice::default()).context("training failed")
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_args: &Args) -> anyhow::Result<trainer::TrainSummary> {
    anyhow::bail!("this trainer was built without CUDA; rebuild with `--features cuda`")
}
