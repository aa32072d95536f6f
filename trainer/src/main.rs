//! `cargo run -p trainer`: fine-tunes Mixtral on alpaca-style data. With no arguments it trains the
//! tiny preset on the bundled dataset on the CPU and writes `results/metrics.jsonl` and
//! `results/train_summary.json`.
//!
//! Data parallelism: `--nproc-per-node N` runs N in-process ranks on the CPU backend, or launches N
//! worker processes (one per GPU, NCCL) with `--device cuda`; a process started by `torchrun` or
//! `srun` with torchrun's variables joins that group instead.

use std::time::Duration;

use anyhow::{Context, bail};
use burn_moe_backend::dist::{CommConfig, DistEnv, ThreadComm};
use clap::Parser;
use trainer::Args;
use trainer::cli::Device;
use trainer::launch::{is_launched_worker, run_workers};
use trainer::train::{train, train_with};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let env = DistEnv::from_env().context("reading the distributed environment")?;
    let timeout = Duration::from_secs_f64(args.collective_timeout);
    let wants_parallel = args.nproc_per_node > 1 || args.nnodes > 1;

    select_grouped_gemm(&args)?;
    let summary = match (env, args.device) {
        // A worker of a multi-process group (ours, torchrun's or srun's).
        (Some(env), Device::Cuda) if env.world_size > 1 => run_cuda_rank(&args, &env, timeout)?,
        (Some(env), Device::Ndarray) if env.world_size > 1 => bail!(
            "this process is rank {} of a {}-process group, but --device ndarray runs data-parallel ranks \
             as threads of one process: start it once with --nproc-per-node {} instead",
            env.rank,
            env.world_size,
            env.world_size
        ),
        // The launcher: N processes (GPU) or N threads (CPU).
        (None, Device::Cuda) if wants_parallel && !is_launched_worker() => {
            let program = std::env::current_exe().context("locating this executable to launch workers")?;
            let argv: Vec<_> = std::env::args_os().skip(1).collect();
            if let Err(e) = run_workers(&args.launch_config(), &program, &argv, Duration::from_secs(10)) {
                eprintln!("{e}");
                std::process::exit(e.exit_code());
            }
            return Ok(());
        }
        (None, Device::Ndarray) if wants_parallel => {
            if args.nnodes > 1 {
                bail!("--nnodes {} needs --device cuda: CPU ranks are threads of one process", args.nnodes);
            }
            run_cpu_threads(&args, timeout)?
        }
        (_, Device::Ndarray) => {
            type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
            train::<B>(&args, &Default::default()).context("training failed")?
        }
        (_, Device::Cuda) => run_cuda(&args)?,
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

/// `--nproc-per-node N` on the CPU: N threads, one data-parallel rank each.
fn run_cpu_threads(args: &Args, timeout: Duration) -> anyhow::Result<trainer::TrainSummary> {
    type Inner = burn::backend::NdArray<f32>;
    type B = burn::backend::Autodiff<Inner>;
    let results = ThreadComm::<Inner>::run_ranks(args.nproc_per_node, CommConfig::with_timeout(timeout), |comm| {
        train_with::<B, _>(args, &Default::default(), &comm)
    });
    let mut first = None;
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Ok(Ok(summary)) if rank == 0 => first = Some(summary),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(anyhow::Error::new(e).context(format!("rank {rank} failed"))),
            Err(e) => bail!("rank {rank}: {e}"),
        }
    }
    first.context("rank 0 returned no summary")
}

/// The CUDA backends: fusion-wrapped for f32 runs; plain CubeCL for mixed precision, because
/// burn-cubecl-fusion 0.21 panics autotuning a fused reduce over half-precision tensors
/// (tracel-ai/burn#5292: `codegen/ir.rs:500` index out of bounds, after which every fused op fails).
#[cfg(feature = "cuda")]
mod cuda {
    use burn::backend::cuda::CudaDevice;
    use burn::tensor::backend::Backend;
    use burn_moe_backend::dist::{CollectiveBackend, CudaTensorAccess};
    use burn_moe_backend::{MemoryBackend, MoeBackend};

    /// f32 runs.
    pub type Fused = burn::backend::Cuda<f32>;
    /// `--dtype bf16|f16` runs.
    pub type Plain = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

    /// What the trainer needs of an inner CUDA backend.
    pub trait CudaInner:
        Backend<Device = CudaDevice> + MoeBackend + MemoryBackend + CollectiveBackend<Wire = Self> + CudaTensorAccess
    {
    }
    impl<B: Backend<Device = CudaDevice> + MoeBackend + MemoryBackend + CollectiveBackend<Wire = B> + CudaTensorAccess> CudaInner for B {}
}

/// Calls `$on::<inner backend>($args...)` for the dtype of `$a`.
#[cfg(feature = "cuda")]
macro_rules! cuda_dispatch {
    ($a:expr, $on:ident($($args:expr),*)) => {
        if $a.dtype.compute().is_some() { $on::<cuda::Plain>($($args),*) } else { $on::<cuda::Fused>($($args),*) }
    };
}

/// `--grouped-gemm cublas` is a CUDA choice: refused on the CPU, checked (library loads) before any
/// work on the GPU, and said to be without effect where the MoE ops run under the fusion wrapper.
fn select_grouped_gemm(args: &Args) -> anyhow::Result<()> {
    use burn_moe_backend::GroupedGemm;
    if args.grouped_gemm == GroupedGemm::CubeCl {
        return Ok(());
    }
    if args.device != Device::Cuda {
        bail!("--grouped-gemm {} needs --device cuda (the CPU backend has no vendor GEMM path)", args.grouped_gemm);
    }
    if args.dtype.compute().is_none() || args.kernel() != burn_moe_backend::MoeKernel::Scatter {
        tracing::warn!(
            "--grouped-gemm {} only changes the scatter kernel's GEMMs under --dtype bf16|f16 (f32 CUDA runs use the \
             fusion-wrapped backend, whose MoE ops are standard Burn ops); this run (--moe-kernel {}, --dtype {}) will not use it",
            args.grouped_gemm,
            args.kernel(),
            args.dtype
        );
    }
    burn_moe_backend::set_grouped_gemm(args.grouped_gemm).with_context(|| format!("--grouped-gemm {}", args.grouped_gemm))
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &Args) -> anyhow::Result<trainer::TrainSummary> {
    fn on<I: cuda::CudaInner>(args: &Args) -> anyhow::Result<trainer::TrainSummary> {
        train::<burn::backend::Autodiff<I>>(args, &burn::backend::cuda::CudaDevice::default()).context("training failed")
    }
    cuda_dispatch!(args, on(args))
}

#[cfg(feature = "cuda")]
fn run_cuda_rank(args: &Args, env: &DistEnv, timeout: Duration) -> anyhow::Result<trainer::TrainSummary> {
    fn on<I: cuda::CudaInner>(args: &Args, env: &DistEnv, timeout: Duration) -> anyhow::Result<trainer::TrainSummary> {
        use burn_moe_backend::dist::{NcclComm, NcclConfig};
        let device = burn::backend::cuda::CudaDevice { index: env.local_rank };
        let comm = NcclComm::<I>::init(env, device.clone(), NcclConfig { timeout, ..NcclConfig::default() })
            .with_context(|| format!("rank {} joining the NCCL group", env.rank))?;
        train_with::<burn::backend::Autodiff<I>, _>(args, &device, &comm).with_context(|| format!("rank {} failed", env.rank))
    }
    cuda_dispatch!(args, on(args, env, timeout))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_args: &Args) -> anyhow::Result<trainer::TrainSummary> {
    bail!("this trainer was built without CUDA; rebuild with `--features cuda`")
}

#[cfg(not(feature = "cuda"))]
fn run_cuda_rank(_args: &Args, _env: &DistEnv, _timeout: Duration) -> anyhow::Result<trainer::TrainSummary> {
    bail!("this trainer was built without CUDA; rebuild with `--features cuda`")
}
