//! dMoE layer benchmark and GPU correctness check (Mixtral layer shapes by default).
//!
//! ```text
//! cargo run --release -p examples --example moe_bench --features cuda -- --backend cuda
//! ```
//!
//! For each token count: forward and forward+backward time and TFLOP/s of the `reference` and
//! `scatter` paths, or those listed in `--kernels` (e.g. `block-sparse`) (2·T·k·3·d·ffn FLOPs per
//! forward, ×3 for forward+backward), Burn's own dense matmul
//! on `[T·k, d] × [d, ffn]` for comparison, and with `--check` the error of the layer (output and
//! every gradient) against an f32 reference computed on the same device.

use std::time::Instant;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::tensor::{DType, Distribution, FloatDType, Tensor, TensorData, backend::Backend};
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement};
use burn_moe_backend::{DMoe, GroupedGemm, MoeBackend, MoeKernel, set_grouped_gemm};
use clap::{Parser, ValueEnum};
use cubecl::CubeElement;
use kernels_cubecl::scatter::{
    CMMA_PIPELINED_DEFAULT, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT, GroupedMatmulStrategy, TILE_GROUP_DEFAULT, set_pipelined_defaults, set_wgmma_enabled,
    set_tile_group,
};

#[derive(Parser, Debug)]
struct Args {
    /// Device backend.
    #[arg(long, value_enum, default_value_t = Kind::Cuda)]
    backend: Kind,
    /// Comma-separated token counts.
    #[arg(long, default_value = "4096,16384", value_delimiter = ',')]
    tokens: Vec<usize>,
    #[arg(long, default_value_t = 4096)]
    d: usize,
    #[arg(long, default_value_t = 14336)]
    ffn: usize,
    #[arg(long, default_value_t = 8)]
    experts: usize,
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Timed repetitions (median reported) after one warm-up.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Element type of the timed runs.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// Paths to time.
    #[arg(long, default_value = "reference,scatter", value_delimiter = ',')]
    kernels: Vec<MoeKernel>,
    /// Also check output and gradients against an f32 reference (at the first token count).
    #[arg(long)]
    check: bool,
    /// Only time (and check) the grouped GEMMs of the layer on their own: Burn's per-segment matmul
    /// (the old path) and the `kernels-cubecl` tiled / tensor-core kernels, bf16 storage.
    #[arg(long)]
    gemm: bool,
    /// With `--gemm`, also time Burn's per-segment matmul (autotunes each new segment shape first).
    #[arg(long)]
    gemm_old: bool,
    /// Time the parts of the `scatter` forward one by one (router, host routing plan, permute,
    /// grouped GEMMs, SwiGLU, combine), each bracketed by device syncs, for each `--grouped-gemm`.
    #[arg(long)]
    phases: bool,
    /// Only one warm-up and one forward+backward of the first `--kernels` path with the first
    /// `--grouped-gemm` library at the first token count (for a profiler such as `ncu`).
    #[arg(long)]
    profile: bool,
    /// Libraries for the `scatter` path's expert GEMMs (CUDA): each is timed (and, with `--check`,
    /// checked) in turn; `cublas` needs libcublas on the library path.
    #[arg(long, default_value = "cubecl", value_delimiter = ',')]
    grouped_gemm: Vec<GroupedGemm>,
    /// Pipelined tensor-core configurations that `Auto` uses in the layer, `<forward>/<weight
    /// gradient>` each `<block_k>x<stages>[w][m]` (`w`: wide plane layout, `m`: manual MMA, where
    /// the device has it, else the same on the wmma path), e.g. `64x2/32x4,64x2w/32x4w,64x2wm/32x4wm`;
    /// `default` = the compiled-in choice (on a Hopper GPU the wgmma kernel; elsewhere the pipelined
    /// defaults), `cubecl` = the compiled-in pipelined defaults without the wgmma kernel; an explicit
    /// configuration also leaves the wgmma kernel out. The CubeCL layer is timed once per entry.
    #[arg(long, default_value = "default", value_delimiter = ',')]
    pipelined: Vec<PipelinedChoice>,
    /// Row tiles per group in the pipelined kernels' tile order (`set_tile_group`; 0 = launch
    /// order): each value is timed in turn, in the GEMM section and for the CubeCL layer. Empty:
    /// the compiled-in default only.
    #[arg(long, value_delimiter = ',')]
    tile_group: Vec<usize>,
    /// With `--gemm`, only these tensor-core strategies (`cmma`, `64x2`, `32x4w`, `64x2wm` (manual
    /// MMA: ldmatrix + mma.sync), ...); default all.
    #[arg(long, value_delimiter = ',')]
    gemm_strategies: Vec<GroupedMatmulStrategy>,
}

/// `--tile-group` as the values to run: `None` = leave the default.
fn tile_groups(args: &Args) -> Vec<Option<usize>> {
    if args.tile_group.is_empty() { vec![None] } else { args.tile_group.iter().map(|&g| Some(g)).collect() }
}

/// Applies one [`tile_groups`] entry; returns the label suffix.
fn apply_tile_group(g: Option<usize>) -> String {
    set_tile_group(g.unwrap_or(TILE_GROUP_DEFAULT));
    g.map_or_else(String::new, |g| format!(" [tile group {g}]"))
}

/// One `--pipelined` entry: `None` = the compiled-in defaults; `wgmma` = whether `Auto` may run the
/// Hopper kernel (`default`: yes; `cubecl` and any explicit configuration: no, the portable
/// CubeCL kernels only).
#[derive(Debug, Clone, Copy)]
struct PipelinedChoice(Option<(GroupedMatmulStrategy, GroupedMatmulStrategy)>, bool);

impl PipelinedChoice {
    const DEFAULT: Self = Self(None, true);

    /// Makes this entry what `Auto` runs, for the whole process.
    fn apply(self) {
        set_pipelined_defaults(self.0).expect("validated when parsed");
        set_wgmma_enabled(self.1);
    }
}

impl std::str::FromStr for PipelinedChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => return Ok(Self::DEFAULT),
            "cubecl" => return Ok(Self(None, false)),
            _ => {}
        }
        let (f, w) = s.split_once('/').ok_or_else(|| format!("`{s}`: expected default, cubecl or <forward>/<weight gradient>, e.g. 64x2/32x4"))?;
        let parse = |v: &str| v.parse::<GroupedMatmulStrategy>().map_err(|e| e.to_string());
        let choice = (parse(f)?, parse(w)?);
        // The strategy's own parser checked the numbers; `set_pipelined_defaults` also wants pipelined ones.
        if let Some(other) = [choice.0, choice.1].into_iter().find(|s| !matches!(s, GroupedMatmulStrategy::CmmaPipelined { .. })) {
            return Err(format!("`{s}`: {other} is not a pipelined configuration (<block_k>x<stages>[w][m])"));
        }
        Ok(Self(Some(choice), false))
    }
}

impl std::fmt::Display for PipelinedChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (fw, wg) = self.0.unwrap_or((CMMA_PIPELINED_DEFAULT, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT));
        if self.1 { write!(f, "wgmma|{fw}/{wg}") } else { write!(f, "{fw}/{wg}") }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    Wgpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
enum Dtype {
    F32,
    Bf16,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.backend {
        Kind::Wgpu => run::<burn::backend::wgpu::WgpuRuntime>(&args, &Default::default()),
        Kind::Cuda => run_cuda(&args),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &Args) -> Result<()> {
    run::<cubecl::cuda::CudaRuntime>(args, &Default::default())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &Args) -> Result<()> {
    anyhow::bail!("built without CUDA; rebuild with `--features cuda`")
}

fn run<R: CubeRuntime>(args: &Args, device: &R::Device) -> Result<()> {
    println!(
        "moe_bench: d={} ffn={} E={} k={} dtype={:?} reps={} device={:?}",
        args.d, args.ffn, args.experts, args.top_k, args.dtype, args.reps, device
    );
    if (args.gemm || args.dtype == Dtype::Bf16) && !supports_bf16::<R>(device) {
        anyhow::bail!(
            "{}: this device has no bf16 (wgpu: WGSL has none); use --dtype f32 (the GEMM section is bf16 only)",
            if args.gemm { "--gemm" } else { "--dtype bf16" }
        );
    }
    if args.gemm {
        gemm::<R>(args, device);
        return Ok(());
    }
    // The check, the phases and the profile run with the first `--pipelined` entry.
    args.pipelined[0].apply();
    if args.phases {
        match args.dtype {
            Dtype::F32 => phases::<R, f32>(args, device),
            Dtype::Bf16 => phases::<R, half::bf16>(args, device),
        }
        return Ok(());
    }
    if args.profile {
        match args.dtype {
            Dtype::F32 => profile::<R, f32>(args, device),
            Dtype::Bf16 => profile::<R, half::bf16>(args, device),
        }
        return Ok(());
    }
    if args.check {
        check::<R>(args, device);
    }
    match args.dtype {
        Dtype::F32 => time_all::<R, f32>(args, device),
        Dtype::Bf16 => time_all::<R, half::bf16>(args, device),
    }
    Ok(())
}

fn sync<B: Backend>(device: &B::Device) {
    B::sync(device).expect("device sync");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The storage type of `F`. Tensors are cast to it explicitly: a `CubeBackend<_, bf16>` creates f32
/// tensors when the device's default float type is f32, and the kernels follow the runtime dtype.
fn float_dtype<F: FloatElement>() -> FloatDType {
    match F::dtype() {
        DType::BF16 => FloatDType::BF16,
        DType::F16 => FloatDType::F16,
        _ => FloatDType::F32,
    }
}

/// Same random layer on any backend: the weights are drawn on the host from a fixed seed.
fn layer<B: MoeBackend>(args: &Args, device: &B::Device, kernel: MoeKernel, seed: u64, dtype: FloatDType) -> DMoe<B> {
    let (e, d, f) = (args.experts, args.d, args.ffn);
    let rnd = |n: usize, s: u64, scale: f32| -> Vec<f32> {
        let mut x = s.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    };
    let t3 = |shape: [usize; 3], s, scale| {
        Tensor::<B, 3>::from_data(TensorData::new(rnd(shape.iter().product(), s, scale), shape), device).cast(dtype)
    };
    DMoe::from_weights(
        Tensor::<B, 2>::from_data(TensorData::new(rnd(e * d, seed, 1.0 / (d as f32).sqrt()), [e, d]), device).cast(dtype),
        t3([e, f, d], seed + 1, 1.0 / (d as f32).sqrt()),
        t3([e, f, d], seed + 2, 1.0 / (d as f32).sqrt()),
        t3([e, d, f], seed + 3, 1.0 / (f as f32).sqrt()),
        args.top_k,
        kernel,
    )
}

/// The benchmarked backend: CubeCL kernels straight, no fusion wrapper.
type Cube<R, F> = CubeBackend<R, F, i32, u8>;

fn time_all<R: CubeRuntime, F: FloatElement>(args: &Args, device: &R::Device) {
    type B<R, F> = Cube<R, F>;
    let device: &<B<R, F> as burn::tensor::backend::BackendTypes>::Device = device;
    for &t in &args.tokens {
        let flops_fwd = 2.0 * (t * args.top_k) as f64 * 3.0 * args.d as f64 * args.ffn as f64;
        // Dense reference: Burn's own matmul at the same per-GEMM shape ([T·k, d] × [d, ffn]).
        let dtype = float_dtype::<F>();
        let a = Tensor::<B<R, F>, 2>::random([t * args.top_k, args.d], Distribution::Default, device).cast(dtype);
        let b = Tensor::<B<R, F>, 2>::random([args.d, args.ffn], Distribution::Default, device).cast(dtype);
        println!("T={t} timed dtype: {:?}", a.dtype());
        let mut times = Vec::new();
        for rep in 0..=args.reps {
            sync::<B<R, F>>(device);
            let start = Instant::now();
            let c = a.clone().matmul(b.clone());
            sync::<B<R, F>>(device);
            if rep > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
            drop(c);
        }
        let dense = median(times);
        let gemm_flops = 2.0 * (t * args.top_k) as f64 * args.d as f64 * args.ffn as f64;
        println!("T={t} burn dense matmul [{}x{}]x[{}x{}]: {:.3} ms, {:.1} TFLOP/s", t * args.top_k, args.d, args.d, args.ffn, dense * 1e3, gemm_flops / dense / 1e12);
        drop((a, b));

        let runs: Vec<(MoeKernel, GroupedGemm, PipelinedChoice, Option<usize>)> = args
            .kernels
            .iter()
            .flat_map(|&k| {
                let libs = if k == MoeKernel::Scatter { args.grouped_gemm.clone() } else { vec![GroupedGemm::CubeCl] };
                libs.into_iter().flat_map(move |g| {
                    let cubecl = k == MoeKernel::Scatter && g == GroupedGemm::CubeCl;
                    let choices = if cubecl { args.pipelined.clone() } else { vec![PipelinedChoice::DEFAULT] };
                    let groups = if cubecl { tile_groups(args) } else { vec![None] };
                    choices.into_iter().flat_map(move |c| groups.clone().into_iter().map(move |tg| (k, g, c, tg)))
                })
            })
            .collect();
        for (kernel, lib, choice, group) in runs {
            if let Err(e) = set_grouped_gemm(lib) {
                println!("T={t} {kernel} {lib}: skipped ({e})");
                continue;
            }
            choice.apply();
            let group_label = apply_tile_group(group);
            let label = match kernel {
                MoeKernel::Scatter if lib == GroupedGemm::CubeCl && args.pipelined.len() > 1 => format!("{kernel}+{lib}[{choice}]{group_label}"),
                MoeKernel::Scatter => format!("{kernel}+{lib}{group_label}"),
                _ => kernel.to_string(),
            };
            let x = Tensor::<B<R, F>, 2>::random([t, args.d], Distribution::Default, device).cast(dtype);
            let moe = layer::<B<R, F>>(args, device, kernel, 7, dtype);
            let mut fwd = Vec::new();
            for rep in 0..=args.reps {
                sync::<B<R, F>>(device);
                let start = Instant::now();
                let out = moe.forward(x.clone()).output;
                sync::<B<R, F>>(device);
                if rep > 0 {
                    fwd.push(start.elapsed().as_secs_f64());
                }
                drop(out);
            }
            // Only the autodiff copy of the weights stays: the memory figures below count what lives
            // before the step (weights, input) as static, as the torch anchor does.
            drop(moe);
            let moe_ad = layer::<Autodiff<B<R, F>>>(args, device, kernel, 7, dtype);
            let x_ad = Tensor::<Autodiff<B<R, F>>, 2>::from_inner(x.clone()).require_grad();
            let (mut both, mut queued) = (Vec::new(), Vec::new());
            for rep in 0..=args.reps {
                sync::<B<R, F>>(device);
                let start = Instant::now();
                let out = moe_ad.forward(x_ad.clone()).output;
                // The output's own backward (a gradient of ones, Burn's root gradient): no loss reduction
                // in the timed step, as the torch anchors' `y.backward(gy)` with a prepared `gy`. (A
                // `sum()` first added ~0.9 ms at T=4096: Burn's full reduction of a [4096, 4096] bf16
                // tensor runs on 2 cubes — a harness cost, not the layer's.)
                let grads = out.backward();
                // When the host has queued everything: close to the total means the host (or a
                // read-back that waits for the device) sets the pace, not the kernels.
                let host = start.elapsed().as_secs_f64();
                sync::<B<R, F>>(device);
                if rep > 0 {
                    both.push(start.elapsed().as_secs_f64());
                    queued.push(host);
                }
                drop(grads);
            }
            let (f, fb) = (median(fwd), median(both));
            println!(
                "T={t} {label}: forward {:.3} ms {:.1} TFLOP/s | fwd+bwd {:.3} ms {:.1} TFLOP/s (host done queuing at {:.3} ms)",
                f * 1e3,
                flops_fwd / f / 1e12,
                fb * 1e3,
                3.0 * flops_fwd / fb / 1e12,
                median(queued) * 1e3
            );
            // One more, untimed step under the memory poller (polling contends with submission).
            let mem = memory_while::<R>(device, || {
                let out = moe_ad.forward(x_ad.clone()).output;
                let grads = out.backward();
                sync::<B<R, F>>(device);
                drop(grads);
            });
            println!("T={t} {label}: fwd+bwd memory {mem}");
        }
        set_grouped_gemm(GroupedGemm::CubeCl).expect("cubecl is always available");
        PipelinedChoice::DEFAULT.apply();
        set_tile_group(TILE_GROUP_DEFAULT);
    }
}

/// Allocator figures of one step: what lived before it (`static`), the largest amount of live
/// tensor memory seen during it (`peak`), and the largest pool reservation.
struct MemoryPeak {
    static_bytes: u64,
    peak_in_use: u64,
    peak_reserved: u64,
    polls: u64,
}

impl std::fmt::Display for MemoryPeak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // GiB as the torch anchor prints them; MiB for small layers, where GiB would read 0.00.
        let (unit, scale) = if self.peak_in_use < 1 << 30 { ("MiB", 20) } else { ("GiB", 30) };
        let v = |b: u64| b as f64 / (1u64 << scale) as f64;
        write!(
            f,
            "peak {:.2} {unit} (static {:.2}, transient {:.2}; sampled over {} polls) | pool reserved peak {:.2} {unit}",
            v(self.peak_in_use),
            v(self.static_bytes),
            v(self.peak_in_use.saturating_sub(self.static_bytes)),
            self.polls,
            v(self.peak_reserved)
        )
    }
}

/// Runs `f` on this thread while a second thread polls the memory manager of this thread's stream.
///
/// Why polled: CubeCL 0.10 reports current use only (no high-water mark). Allocation happens when an
/// operation is submitted, so the poller sees the same logical state as torch's
/// `max_memory_allocated` does, but only between polls: the peak is a lower bound (a high point
/// shorter than one poll can be missed), and the pool's reservation bounds it from above.
fn memory_while<R: CubeRuntime>(device: &R::Device, f: impl FnOnce()) -> MemoryPeak {
    use std::sync::atomic::{AtomicBool, Ordering};
    let client = R::client(device);
    let before = client.memory_usage().expect("memory usage");
    let stream = cubecl::stream_id::StreamId::current();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        let mut client = client.clone();
        // SAFETY: the poller only reads the allocator state of the benchmark thread's stream;
        // it submits no work on it.
        unsafe { client.set_stream(stream) };
        std::thread::spawn(move || {
            let (mut in_use, mut reserved, mut polls) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let u = client.memory_usage().expect("memory usage");
                in_use = in_use.max(u.bytes_in_use);
                reserved = reserved.max(u.bytes_reserved);
                polls += 1;
            }
            (in_use, reserved, polls)
        })
    };
    f();
    stop.store(true, Ordering::Relaxed);
    let (in_use, reserved, polls) = poller.join().expect("memory poller");
    MemoryPeak {
        static_bytes: before.bytes_in_use,
        peak_in_use: in_use.max(before.bytes_in_use),
        peak_reserved: reserved.max(before.bytes_reserved),
        polls,
    }
}

/// Whether `device` stores and computes bf16 (CUDA does; wgpu does not: WGSL has no bf16).
fn supports_bf16<R: CubeRuntime>(device: &R::Device) -> bool {
    use cubecl::ir::{ElemType, FloatKind, StorageType};
    R::client(device).properties().features.supports_type(StorageType::Scalar(ElemType::Float(FloatKind::BF16)))
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    d / n.max(1e-30)
}

fn outputs<R: CubeRuntime, F: FloatElement>(args: &Args, device: &R::Device, kernel: MoeKernel, t: usize) -> Vec<(&'static str, Vec<f32>)> {
    type B<R, F> = Cube<R, F>;
    let dtype = float_dtype::<F>();
    let moe = layer::<Autodiff<B<R, F>>>(args, device, kernel, 11, dtype);
    let xv: Vec<f32> = (0..t * args.d).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let x = Tensor::<Autodiff<B<R, F>>, 2>::from_data(TensorData::new(xv, [t, args.d]), device).cast(dtype).require_grad();
    assert_eq!(x.dtype(), F::dtype(), "input is not stored as {:?}", F::dtype());
    let out = moe.forward(x.clone()).output;
    let host = |v: TensorData| v.convert::<f32>().iter::<f32>().collect::<Vec<_>>();
    let y = host(out.clone().into_data());
    let g = out.sum().backward();
    vec![
        ("output", y),
        ("x", host(x.grad(&g).unwrap().into_data())),
        ("w1", host(moe.w1.val().grad(&g).unwrap().into_data())),
        ("w3", host(moe.w3.val().grad(&g).unwrap().into_data())),
        ("w2", host(moe.w2.val().grad(&g).unwrap().into_data())),
        ("gate", host(moe.gate.val().grad(&g).unwrap().into_data())),
    ]
}

fn check<R: CubeRuntime>(args: &Args, device: &R::Device) {
    let t = args.tokens[0];
    let want = outputs::<R, f32>(args, device, MoeKernel::Reference, t);
    let mut failures = 0;
    // f32 bound 1e-4: the scatter path sums in another order than the reference (combine and the
    // gather-side scatter-adds) and computes SwiGLU with its own fused kernel; at d=1024, ffn=3584 that
    // measured 5e-6 (output) to 4e-5 (router gradient) on an H200.
    let bf16 = supports_bf16::<R>(device);
    let mut runs = vec![("scatter f32", 1e-4, outputs::<R, f32>(args, device, MoeKernel::Scatter, t))];
    if bf16 {
        runs.push(("scatter bf16", 1e-2, outputs::<R, half::bf16>(args, device, MoeKernel::Scatter, t)));
        runs.push(("reference bf16", 1e-2, outputs::<R, half::bf16>(args, device, MoeKernel::Reference, t)));
    } else {
        println!("check: this device has no bf16 (e.g. wgpu: WGSL has none); bf16 runs skipped");
    }
    if bf16 && args.grouped_gemm.contains(&GroupedGemm::Cublas) {
        match set_grouped_gemm(GroupedGemm::Cublas) {
            Ok(()) => {
                // cuBLAS's f32 GEMM and Burn's f32 matmul differ at the TF32 rounding level (3-5e-4
                // measured); which side rounds is not established.
                runs.push(("scatter+cublas f32", 1e-3, outputs::<R, f32>(args, device, MoeKernel::Scatter, t)));
                runs.push(("scatter+cublas bf16", 1e-2, outputs::<R, half::bf16>(args, device, MoeKernel::Scatter, t)));
            }
            Err(e) => {
                failures += 1;
                println!("check: cublas unavailable: {e}");
            }
        }
        set_grouped_gemm(GroupedGemm::CubeCl).expect("cubecl is always available");
    }
    // The block-sparse kernels are the untiled baseline: checked only when asked for.
    if args.kernels.contains(&MoeKernel::BlockSparse) {
        runs.push(("block-sparse f32", 1e-5, outputs::<R, f32>(args, device, MoeKernel::BlockSparse, t)));
    }
    let runs_bf16: Vec<Vec<(&str, Vec<f32>)>> =
        runs.iter().filter(|r| r.0.contains("bf16")).map(|r| r.2.clone()).collect();
    for (label, tol, got) in runs {
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            let err = rel_l2(a, b);
            if label.contains("bf16") {
                // bf16 against the f32 reference also sees the router flip top-k choices (the reference
                // path itself differs as much): informative only; the same-routing lines below decide.
                println!("check T={t} {label} {name}: rel L2 {err:.2e} (vs f32, routing may differ: not checked)");
                continue;
            }
            let ok = err <= tol;
            if !ok {
                failures += 1;
            }
            println!("check T={t} {label} {name}: rel L2 {err:.2e} (bound {tol:.0e}) {}", if ok { "ok" } else { "FAIL" });
        }
    }
    // Same precision, same routing: the bf16 router picks the same experts on both paths, so this
    // isolates the kernels (the bf16-vs-f32 lines above also see routing flips).
    let mut same_routing = Vec::new();
    if let [scatter, reference, rest @ ..] = runs_bf16.as_slice() {
        same_routing.push(("scatter bf16", scatter, reference));
        if let Some(cublas) = rest.first() {
            same_routing.push(("scatter+cublas bf16", cublas, reference));
        }
    }
    for (label, scatter, reference) in same_routing {
        for ((name, a), (_, b)) in scatter.iter().zip(reference) {
            let err = rel_l2(a, b);
            let ok = err <= 2e-2 || name == &"gate";
            if !ok {
                failures += 1;
            }
            println!("check T={t} {label} vs reference bf16 {name}: rel L2 {err:.2e} (bound 2e-2) {}", if ok { "ok" } else { "FAIL" });
        }
    }
    println!("check: {} failures", failures);
}

/// "ok" when `err` is within 1e-2 of a reference that is not all zeros (an all-zero reference means
/// the f32 run itself produced nothing, and would make any error look like 0).
fn verdict(err: f64, want: &[f32]) -> &'static str {
    if err <= 1e-2 && want.iter().any(|v| *v != 0.0) { "ok" } else { "FAIL" }
}

/// Median seconds of `reps` timed calls of `f` after one warm-up.
/// One kernel variant of the GEMM section: a variant that fails to compile or launch on this device
/// (an error or a panic) is reported and skipped, not fatal; otherwise its output is checked against
/// `want` and it is timed. `empty` makes an output buffer, `read` reads one back as f32.
#[allow(clippy::too_many_arguments)]
fn bench_variant<R: CubeRuntime>(
    device: &R::Device,
    reps: usize,
    label: &str,
    flops: f64,
    empty: impl Fn() -> cubecl::server::Handle,
    poisoned: impl Fn() -> cubecl::server::Handle,
    launch: &dyn Fn(cubecl::server::Handle) -> Result<GroupedMatmulStrategy, kernels_cubecl::scatter::KernelError>,
    read: &dyn Fn(cubecl::server::Handle) -> Vec<f32>,
    want: &[f32],
) {
    // The checked run writes into NaN: an `empty` buffer may be memory an earlier variant filled with
    // the right answer, which would hide a kernel that wrote nothing.
    let out = poisoned();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| launch(out.clone())));
    if !matches!(ran, Ok(Ok(_))) {
        println!("{label}: FAILED to run ({:?})", ran.map(|r| r.err()).map_err(|_| "panic"));
        return;
    }
    let err = rel_l2(&read(out), want);
    let secs = time_it::<Cube<R, half::bf16>>(device, reps, || {
        launch(empty()).unwrap();
    });
    println!("{label}: {:.3} ms {:.1} TFLOP/s | rel L2 vs f32 tiled {err:.2e} (bound 1e-2) {}", secs * 1e3, flops / secs / 1e12, verdict(err, want));
}

fn time_it<B: Backend>(device: &B::Device, reps: usize, mut f: impl FnMut()) -> f64 {
    let mut times = Vec::new();
    for rep in 0..=reps {
        sync::<B>(device);
        let start = Instant::now();
        f();
        sync::<B>(device);
        if rep > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    median(times)
}

/// The grouped GEMMs of the layer alone: `x · w1[e]ᵀ` (`[T·k, d] × [E, ffn, d]`, up projection) and
/// `h · w2[e]` (`[T·k, ffn] × [E, ffn, d]`, down projection as in the backward of the up projection),
/// uneven segments (expert `e` gets a share ∝ `e + 1`, expert 0 none when E > 2), and the weight
/// gradient of the up projection. Each bf16 kernel's output is checked against the f32 tiled kernel
/// run on the same bf16-rounded operands.
fn gemm<R: CubeRuntime>(args: &Args, device: &R::Device) {
    use kernels_cubecl::scatter::{
        GroupedMatmulProblem, cmma_pipelined_manual_supported, cmma_pipelined_supported, cmma_supported, launch_grouped_matmul_weight_grad_with,
        launch_grouped_matmul_with, wgmma_supported,
    };
    // Every tensor-core variant this device can run: the single-stage kernel and the pipelined
    // configurations (depth per step × steps in flight), each also with manual MMA where it runs.
    let cmma_variants = |client: &cubecl::client::ComputeClient<R>, problem: &GroupedMatmulProblem| -> Vec<GroupedMatmulStrategy> {
        let mut v = vec![GroupedMatmulStrategy::Tiled];
        if cmma_supported::<R, half::bf16>(client) {
            v.push(GroupedMatmulStrategy::Cmma);
        } else {
            println!("gemm: no bf16 cmma on this device");
        }
        let configs = [(32, 2, false), (32, 3, false), (32, 4, false), (64, 2, false), (64, 3, false), (32, 4, true), (64, 2, true), (32, 3, true)];
        if cmma_pipelined_supported::<R, half::bf16>(client, problem) {
            for (block_k, stages, wide) in configs {
                v.push(GroupedMatmulStrategy::CmmaPipelined { block_k, stages, wide, manual: false });
            }
        }
        if cmma_pipelined_manual_supported::<R, half::bf16>(client, problem) {
            for (block_k, stages, wide) in configs {
                v.push(GroupedMatmulStrategy::CmmaPipelined { block_k, stages, wide, manual: true });
            }
        } else {
            println!("gemm: no manual MMA (mma.sync + ldmatrix) pipelined kernels on this device");
        }
        if wgmma_supported::<R, half::bf16>(client, problem, false) {
            v.push(GroupedMatmulStrategy::Wgmma);
        } else {
            println!("gemm: no wgmma (Hopper) kernel on this device");
        }
        v.retain(|s| args.gemm_strategies.is_empty() || args.gemm_strategies.contains(s));
        v
    };
    type B<R> = Cube<R, half::bf16>;
    let device: &<B<R> as burn::tensor::backend::BackendTypes>::Device = device;
    let e = args.experts;
    for &t in &args.tokens {
        let rows = t * args.top_k;
        let weights: Vec<usize> = (0..e).map(|i| if e > 2 && i == 0 { 0 } else { i + 1 }).collect();
        let total: usize = weights.iter().sum();
        let mut offsets = vec![0usize];
        for (i, wgt) in weights.iter().enumerate() {
            let end = if i + 1 == e { rows } else { offsets[i] + rows * wgt / total };
            offsets.push(end);
        }
        let counts: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
        println!("gemm T={t} rows={rows} segment rows {counts:?}");
        for (name, m, k, transpose) in [("up x·w1ᵀ", args.ffn, args.d, true), ("down h·w2", args.d, args.ffn, false)] {
            let flops = 2.0 * rows as f64 * m as f64 * k as f64;
            let x = Tensor::<B<R>, 2>::random([rows, k], Distribution::Default, device).cast(FloatDType::BF16);
            let wshape = if transpose { [e, m, k] } else { [e, k, m] };
            let w = (Tensor::<B<R>, 3>::random(wshape, Distribution::Default, device) / (k as f32).sqrt()).cast(FloatDType::BF16);
            if args.gemm_old {
                let old = time_it::<B<R>>(device, args.reps, || {
                    drop(burn_moe_backend::ops::reference_grouped_matmul(x.clone(), w.clone(), &offsets, transpose));
                });
                println!("gemm T={t} {name} [{rows}x{k}]x[{e}x{m}x{k}] burn per-segment matmul (old path): {:.3} ms {:.1} TFLOP/s", old * 1e3, flops / old / 1e12);
            }

            let prim = |t: Tensor<B<R>, 2>| t.into_primitive().tensor();
            let prim3 = |t: Tensor<B<R>, 3>| t.into_primitive().tensor();
            let (xb, wb) = (prim(x.clone()), prim3(w.clone()));
            let (xf, wf) = (prim(x.clone().cast(FloatDType::F32)), prim3(w.clone().cast(FloatDType::F32)));
            let client = xb.client.clone();
            let nan_bf16 = |len: usize| client.create_from_slice(half::bf16::as_bytes(&vec![half::bf16::NAN; len]));
            let problem = GroupedMatmulProblem { rows, m, k, num_experts: e, transpose };
            let offs: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
            let off_h = client.create_from_slice(u32::as_bytes(&offs));
            let read = |h: cubecl::server::Handle, bf: bool| -> Vec<f32> {
                let bytes = client.read_one(h).expect("read back");
                if bf {
                    half::bf16::from_bytes(&bytes)[..rows * m].iter().map(|v| v.to_f32()).collect()
                } else {
                    f32::from_bytes(&bytes)[..rows * m].to_vec()
                }
            };
            let want_h = client.empty(rows * m * 4);
            let ran = launch_grouped_matmul_with::<R, f32>(&client, &problem, &offsets, xf.handle.clone(), wf.handle.clone(), off_h.clone(), want_h.clone(), GroupedMatmulStrategy::Tiled);
            let want = match ran {
                Ok(_) => read(want_h, false),
                Err(err) => {
                    println!("gemm f32 tiled: {err}");
                    continue;
                }
            };
            let f32_tiled = time_it::<B<R>>(device, args.reps, || {
                let out = client.empty(rows * m * 4);
                launch_grouped_matmul_with::<R, f32>(&client, &problem, &offsets, xf.handle.clone(), wf.handle.clone(), off_h.clone(), out, GroupedMatmulStrategy::Tiled).unwrap();
            });
            println!("gemm T={t} {name} f32 tiled: {:.3} ms {:.1} TFLOP/s", f32_tiled * 1e3, flops / f32_tiled / 1e12);
            for strategy in cmma_variants(&client, &problem) {
                for group in tile_groups(args) {
                    let launch = |out| launch_grouped_matmul_with::<R, half::bf16>(&client, &problem, &offsets, xb.handle.clone(), wb.handle.clone(), off_h.clone(), out, strategy);
                    let label = format!("gemm T={t} {name} bf16 {strategy:?}{}", apply_tile_group(group));
                    bench_variant::<R>(device, args.reps, &label, flops, || client.empty(rows * m * 2), || nan_bf16(rows * m), &launch, &|h| read(h, true), &want);
                }
            }
            set_tile_group(TILE_GROUP_DEFAULT);
            let cublas = args.grouped_gemm.contains(&GroupedGemm::Cublas);
            if cublas && set_grouped_gemm(GroupedGemm::Cublas).is_ok() {
                let out = <B<R> as MoeBackend>::moe_grouped_matmul(xb.clone(), wb.clone(), &offsets, transpose);
                let err = rel_l2(&read(out.handle.clone(), true), &want);
                let secs = time_it::<B<R>>(device, args.reps, || {
                    drop(<B<R> as MoeBackend>::moe_grouped_matmul(xb.clone(), wb.clone(), &offsets, transpose));
                });
                println!(
                    "gemm T={t} {name} bf16 cuBLAS (per segment): {:.3} ms {:.1} TFLOP/s | rel L2 vs f32 tiled {err:.2e} (bound 1e-2) {}",
                    secs * 1e3,
                    flops / secs / 1e12,
                    verdict(err, &want)
                );
                set_grouped_gemm(GroupedGemm::CubeCl).expect("cubecl is always available");
            } else if cublas {
                println!("gemm: cuBLAS unavailable: {}", set_grouped_gemm(GroupedGemm::Cublas).unwrap_err());
            }
            if !transpose {
                continue;
            }
            // Weight gradient of the up projection: dw1[e] = dh[seg]ᵀ · x[seg], [E, ffn, d].
            let dh = prim(Tensor::<B<R>, 2>::random([rows, m], Distribution::Default, device).cast(FloatDType::BF16));
            let dhf = prim(Tensor::<B<R>, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(dh.clone())).cast(FloatDType::F32));
            let n = e * m * k;
            let read_w = |h: cubecl::server::Handle, bf: bool| -> Vec<f32> {
                let bytes = client.read_one(h).expect("read back");
                if bf {
                    half::bf16::from_bytes(&bytes)[..n].iter().map(|v| v.to_f32()).collect()
                } else {
                    f32::from_bytes(&bytes)[..n].to_vec()
                }
            };
            let want_h = client.empty(n * 4);
            launch_grouped_matmul_weight_grad_with::<R, f32>(&client, &problem, &offsets, dhf.handle.clone(), xf.handle.clone(), off_h.clone(), want_h.clone(), GroupedMatmulStrategy::Tiled).unwrap();
            let want = read_w(want_h, false);
            for strategy in cmma_variants(&client, &GroupedMatmulProblem { transpose: false, ..problem }) {
                for group in tile_groups(args) {
                    let launch = |out| launch_grouped_matmul_weight_grad_with::<R, half::bf16>(&client, &problem, &offsets, dh.handle.clone(), xb.handle.clone(), off_h.clone(), out, strategy);
                    let label = format!("gemm T={t} weight grad dh[seg]ᵀ·x[seg] -> [{e}x{m}x{k}] bf16 {strategy:?}{}", apply_tile_group(group));
                    bench_variant::<R>(device, args.reps, &label, flops, || client.empty(n * 2), || nan_bf16(n), &launch, &|h| read_w(h, true), &want);
                }
            }
            set_tile_group(TILE_GROUP_DEFAULT);
            if cublas && set_grouped_gemm(GroupedGemm::Cublas).is_ok() {
                let dw = <B<R> as MoeBackend>::moe_grouped_matmul_weight_grad(dh.clone(), xb.clone(), &offsets);
                let err = rel_l2(&read_w(dw.handle.clone(), true), &want);
                let secs = time_it::<B<R>>(device, args.reps, || {
                    drop(<B<R> as MoeBackend>::moe_grouped_matmul_weight_grad(dh.clone(), xb.clone(), &offsets));
                });
                println!(
                    "gemm T={t} weight grad dh[seg]ᵀ·x[seg] -> [{e}x{m}x{k}] bf16 cuBLAS (per segment): {:.3} ms {:.1} TFLOP/s | rel L2 vs f32 tiled {err:.2e} (bound 1e-2) {}",
                    secs * 1e3,
                    flops / secs / 1e12,
                    verdict(err, &want)
                );
                set_grouped_gemm(GroupedGemm::CubeCl).expect("cubecl is always available");
            }
        }
    }
}

/// The scatter forward taken apart: each step timed on its own between device syncs (median of
/// `reps` after a warm-up), so the time outside the GEMMs shows where it goes.
fn phases<R: CubeRuntime, F: FloatElement>(args: &Args, device: &R::Device) {
    use burn::tensor::Int;
    use burn_moe_backend::ops::{moe_combine, moe_grouped_matmul, moe_permute};
    type B<R, F> = Cube<R, F>;
    let device: &<B<R, F> as burn::tensor::backend::BackendTypes>::Device = device;
    let dtype = float_dtype::<F>();
    for &lib in &args.grouped_gemm {
        if let Err(e) = set_grouped_gemm(lib) {
            println!("phases {lib}: skipped ({e})");
            continue;
        }
        for &t in &args.tokens {
            let moe = layer::<B<R, F>>(args, device, MoeKernel::Scatter, 7, dtype);
            let x = Tensor::<B<R, F>, 2>::random([t, args.d], Distribution::Default, device).cast(dtype);
            let (e, k) = (args.experts, args.top_k);
            let mut rows_t = Vec::new();
            let mut report = Vec::new();
            let mut time = |name: &'static str, f: &mut dyn FnMut()| {
                let secs = time_it::<B<R, F>>(device, args.reps, f);
                report.push((name, secs));
            };
            let route = moe.route(x.clone());
            time("router (gate matmul, f32 softmax, top-k, weights)", &mut || drop(moe.route(x.clone())));
            let mut plan = None;
            time("host routing plan (read top-k indices, sort)", &mut || {
                let idx: Vec<i64> = route.experts.clone().into_data().iter::<i64>().collect();
                plan = Some(kernels_cubecl::RoutingPlan::from_expert_indices(&idx, k, e).unwrap());
            });
            let plan = plan.unwrap();
            let rows: Vec<i64> = plan.sorted_token.iter().map(|&r| r as i64).collect();
            let slots: Vec<i64> = plan.slots().into_iter().map(|s| s as i64).collect();
            let n = rows.len();
            time("upload row and slot indices", &mut || {
                rows_t = vec![
                    Tensor::<B<R, F>, 1, Int>::from_data(TensorData::new(rows.clone(), [n]), device),
                    Tensor::<B<R, F>, 1, Int>::from_data(TensorData::new(slots.clone(), [n]), device),
                ];
            });
            let (rows_d, slots_d) = (rows_t[0].clone(), rows_t[1].clone());
            let xs = moe_permute(x.clone(), rows_d.clone());
            time("permute", &mut || drop(moe_permute(x.clone(), rows_d.clone())));
            let gate = moe_grouped_matmul(xs.clone(), moe.w1.val(), &plan.offsets, true);
            let up = moe_grouped_matmul(xs.clone(), moe.w3.val(), &plan.offsets, true);
            time("grouped GEMM w1 (up)", &mut || drop(moe_grouped_matmul(xs.clone(), moe.w1.val(), &plan.offsets, true)));
            let h = burn::tensor::activation::silu(gate.clone()) * up.clone();
            time("SwiGLU silu(gate)·up", &mut || drop(burn::tensor::activation::silu(gate.clone()) * up.clone()));
            let y = moe_grouped_matmul(h.clone(), moe.w2.val(), &plan.offsets, true);
            time("grouped GEMM w2 (down)", &mut || drop(moe_grouped_matmul(h.clone(), moe.w2.val(), &plan.offsets, true)));
            time("combine", &mut || drop(moe_combine(y.clone(), slots_d.clone(), route.weights.clone())));
            let whole = time_it::<B<R, F>>(device, args.reps, || drop(moe.forward(x.clone()).output));
            let sum: f64 = report.iter().map(|r| r.1).sum::<f64>() + report.iter().find(|r| r.0.starts_with("grouped GEMM w1")).map_or(0.0, |r| r.1);
            for (name, secs) in &report {
                println!("phases T={t} {lib} {name}: {:.3} ms", secs * 1e3);
            }
            println!("phases T={t} {lib} sum of parts (w3 counted as w1): {:.3} ms | whole forward: {:.3} ms", sum * 1e3, whole * 1e3);
        }
    }
    set_grouped_gemm(GroupedGemm::CubeCl).expect("cubecl is always available");
}

/// One warm-up and one timed forward+backward, nothing else: what a profiler should see.
fn profile<R: CubeRuntime, F: FloatElement>(args: &Args, device: &R::Device) {
    type B<R, F> = Cube<R, F>;
    let device: &<B<R, F> as burn::tensor::backend::BackendTypes>::Device = device;
    let (t, kernel, lib) = (args.tokens[0], args.kernels[0], args.grouped_gemm[0]);
    set_grouped_gemm(lib).expect("--grouped-gemm");
    let dtype = float_dtype::<F>();
    let moe = layer::<Autodiff<B<R, F>>>(args, device, kernel, 7, dtype);
    let x = Tensor::<Autodiff<B<R, F>>, 2>::random([t, args.d], Distribution::Default, device).cast(dtype).require_grad();
    for pass in ["warm-up", "profiled"] {
        sync::<B<R, F>>(device);
        let start = Instant::now();
        // No loss reduction: the timed runs (and torch's anchors) backpropagate the output itself.
        let grads = moe.forward(x.clone()).output.backward();
        sync::<B<R, F>>(device);
        println!("profile T={t} {kernel}+{lib} {pass} fwd+bwd: {:.3} ms", start.elapsed().as_secs_f64() * 1e3);
        drop(grads);
    }
}
