//! HF parity tool: run an HF Mixtral checkpoint on token ids and write what transformers would give.
//!
//! ```text
//! cargo run --release -p examples --example mixtral_forward -- \
//!     --model DIR --input-ids IDS.safetensors --output OUT.safetensors [--grads]
//! ```
//!
//! `IDS` holds an integer tensor `input_ids [B, S]`. `OUT` receives f32 tensors `logits [B, S, V]`,
//! `loss`, `lm_loss`, `aux_loss` (shape `[]`; labels = input_ids, as HF) and with `--grads`
//! `grad.<name>` for every tensor of the checkpoint. Runs in f32 on the CPU unless told otherwise
//! (`--backend wgpu|cuda`, `--moe-kernel reference|scatter|block-sparse`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn_moe_backend::MoeKernel;
use clap::{Parser, ValueEnum};
use mixtral_burn::HfCheckpoint;
use mixtral_burn::parity::{parity_outputs, read_input_ids, write_f32_safetensors};

#[derive(Parser, Debug)]
#[command(about = "Run an HF Mixtral checkpoint and write logits, losses and gradients (HF parity tool)")]
struct Args {
    /// HF checkpoint directory (config.json + model.safetensors or sharded safetensors + index).
    #[arg(long)]
    model: PathBuf,
    /// safetensors file with an integer tensor `input_ids [B, S]`.
    #[arg(long)]
    input_ids: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    output: PathBuf,
    /// Also write d(loss)/d(tensor) for every checkpoint tensor as `grad.<name>`.
    #[arg(long)]
    grads: bool,
    /// Backend to run on.
    #[arg(long, value_enum, default_value_t = BackendKind::Ndarray)]
    backend: BackendKind,
    /// Expert-computation path of the MoE layers.
    #[arg(long, default_value = "reference")]
    moe_kernel: MoeKernel,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendKind {
    /// burn-ndarray, f32, CPU.
    Ndarray,
    /// CubeCL on wgpu (Vulkan/Metal/DX12, or Mesa lavapipe on a CPU), f32.
    Wgpu,
    /// burn-cuda, f32 (build with `--features cuda`).
    Cuda,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let start = Instant::now();
    let checkpoint = HfCheckpoint::open(&args.model)?;
    let ids = read_input_ids(&args.input_ids, checkpoint.config.vocab_size)?;
    let outputs = match args.backend {
        BackendKind::Ndarray => {
            type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
            parity_outputs::<B>(&checkpoint, ids, args.grads, args.moe_kernel, &Default::default())?
        }
        BackendKind::Wgpu => {
            type B = burn::backend::Autodiff<burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>>;
            parity_outputs::<B>(&checkpoint, ids, args.grads, args.moe_kernel, &Default::default())?
        }
        BackendKind::Cuda => run_cuda(&checkpoint, ids, &args)?,
    };
    write_f32_safetensors(&args.output, &outputs).with_context(|| format!("writing {}", args.output.display()))?;
    let scalar = |key: &str| outputs.iter().find(|(n, _)| n == key).and_then(|(_, d)| d.iter::<f32>().next());
    println!(
        "{}: layout {:?}, loss {:.6} (lm {:.6}, aux {:.6}), {} tensors written to {} in {:.2?}",
        args.model.display(),
        checkpoint.layout,
        scalar("loss").unwrap_or(f32::NAN),
        scalar("lm_loss").unwrap_or(f32::NAN),
        scalar("aux_loss").unwrap_or(f32::NAN),
        outputs.len(),
        args.output.display(),
        start.elapsed()
    );
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_cuda(
    checkpoint: &HfCheckpoint,
    ids: burn::tensor::TensorData,
    args: &Args,
) -> Result<Vec<(String, burn::tensor::TensorData)>> {
    type B = burn::backend::Autodiff<burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>>;
    Ok(parity_outputs::<B>(checkpoint, ids, args.grads, args.moe_kernel, &Default::default())?)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _checkpoint: &HfCheckpoint,
    _ids: burn::tensor::TensorData,
    _args: &Args,
) -> Result<Vec<(String, burn::tensor::TensorData)>> {
    anyhow::bail!("built without CUDA; rebuild with `--features cuda`")
}
