//! The tiled (and, where the runtime has tensor cores, the cmma) grouped GEMM against the plain-Rust
//! reference, generic over the CubeCL runtime; run here on wgpu (Mesa lavapipe in CI), and on CUDA with `--features cuda`.

use cubecl::prelude::*;
use half::f16;
use kernels_cubecl::reference::scatter as reference;
use kernels_cubecl::scatter::{
    CMMA_PIPELINED_DEFAULT, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT, GroupedMatmulProblem, GroupedMatmulStrategy, KernelError, TILED_BLOCK_M, cmma_pipelined_manual_supported, cmma_pipelined_supported, cmma_supported, launch_grouped_matmul,
    launch_grouped_matmul_weight_grad_with, launch_grouped_matmul_with, pipelined_defaults, set_pipelined_defaults, wgmma_enabled, wgmma_supported,
};

mod common;
use common::{max_rel, values};

fn offsets_of(counts: &[usize]) -> Vec<usize> {
    let mut o = vec![0];
    for c in counts {
        o.push(o.last().unwrap() + c);
    }
    o
}

/// Storage precision of a run: the inputs are rounded to it before the reference sees them, so only
/// the kernel's accumulation order and the final rounding differ.
#[derive(Clone, Copy, Debug)]
enum Storage {
    F32,
    F16,
}

impl Storage {
    /// `v` as the kernel will see it once stored in this element type.
    fn round(self, v: Vec<f32>) -> Vec<f32> {
        match self {
            Storage::F32 => v,
            Storage::F16 => v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect(),
        }
    }
}

/// Runs one grouped matmul with `strategy` and compares it with the f64 reference; returns the
/// strategy that ran.
fn check<R: Runtime>(
    client: &ComputeClient<R>,
    counts: &[usize],
    m: usize,
    k: usize,
    transpose: bool,
    storage: Storage,
    strategy: GroupedMatmulStrategy,
) -> Result<GroupedMatmulStrategy, KernelError> {
    let offsets = offsets_of(counts);
    let (e, rows) = (counts.len(), offsets[counts.len()]);
    let label = format!("counts={counts:?} m={m} k={k} transpose={transpose} {storage:?} {strategy:?}");
    let round = |v: Vec<f32>| storage.round(v);
    let x = round(values(rows * k, (rows * 7 + k) as u64));
    let w = round(values(e * m * k, (m * 13 + e) as u64));
    let want = reference::grouped_matmul(&x, &w, &offsets, m, k, transpose);
    let offs: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    let off_h = client.create_from_slice(u32::as_bytes(&offs));
    let problem = GroupedMatmulProblem { rows, m, k, num_experts: e, transpose };
    let (ran, got) = match storage {
        Storage::F32 => {
            let up = |v: &[f32]| client.create_from_slice(f32::as_bytes(if v.is_empty() { &[0.0] } else { v }));
            // Pre-filled with NaN: a row the kernel skipped would show.
            let out = up(&vec![f32::NAN; (rows * m).max(1)]);
            let ran = launch_grouped_matmul_with::<R, f32>(client, &problem, &offsets, up(&x), up(&w), off_h, out.clone(), strategy)?;
            (ran, f32::from_bytes(&client.read_one(out).expect("read back"))[..rows * m].to_vec())
        }
        Storage::F16 => {
            let up = |v: &[f32]| {
                let h: Vec<f16> = if v.is_empty() { vec![f16::ZERO] } else { v.iter().map(|x| f16::from_f32(*x)).collect() };
                client.create_from_slice(f16::as_bytes(&h))
            };
            let out = up(&vec![f32::NAN; (rows * m).max(1)]);
            let ran = launch_grouped_matmul_with::<R, f16>(client, &problem, &offsets, up(&x), up(&w), off_h, out.clone(), strategy)?;
            let bytes = client.read_one(out).expect("read back");
            (ran, f16::from_bytes(&bytes)[..rows * m].iter().map(|v| v.to_f32()).collect())
        }
    };
    let tol = match storage {
        Storage::F32 => 1e-5,
        Storage::F16 => 2e-3,
    };
    assert!(got.iter().all(|v| v.is_finite()), "{label}: an output was not written");
    let err = max_rel(&got, &want);
    assert!(err < tol, "{label}: err {err} (bound {tol})");
    Ok(ran)
}

/// Segment layouts that exercise the tile table: odd sizes, an empty expert (first, middle, last),
/// all rows on one expert, E = 1, a segment spanning several row tiles with a ragged last tile.
fn layouts() -> Vec<Vec<usize>> {
    vec![
        vec![37, 0, 21, 5],
        vec![0, 0, 83, 0],
        vec![29],
        vec![TILED_BLOCK_M + 1, 3, 2 * TILED_BLOCK_M - 1],
        vec![1, 1, 1],
    ]
}

fn f32_cases<R: Runtime>(client: &ComputeClient<R>, strategy: GroupedMatmulStrategy) {
    for counts in layouts() {
        for transpose in [true, false] {
            let ran = check(client, &counts, 100, 60, transpose, Storage::F32, strategy).unwrap();
            assert_eq!(ran, strategy);
        }
    }
    // Tiny and tile-aligned widths.
    check(client, &[5, 0, 3], 1, 1, true, Storage::F32, strategy).unwrap();
    check(client, &[64, 64], 64, 32, false, Storage::F32, strategy).unwrap();
}

#[test]
fn tiled_grouped_matmul_matches_reference_f32_on_wgpu() {
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    f32_cases(&client, GroupedMatmulStrategy::Tiled);
}

#[test]
fn naive_grouped_matmul_matches_reference_on_the_same_layouts() {
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    f32_cases(&client, GroupedMatmulStrategy::Naive);
}

/// f16 storage through `Auto`: the tensor-core kernel where the runtime offers it for f16 → f32
/// (then also with widths that force narrower vector loads), else the shared-memory kernel.
#[test]
fn auto_grouped_matmul_follows_f16_storage_on_wgpu() {
    auto_f16_cases(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

/// What `Auto` resolves to for f16 operands of problem `p` on this client.
fn expected_auto_f16<R: Runtime>(client: &ComputeClient<R>, p: &GroupedMatmulProblem, pipelined: GroupedMatmulStrategy, weight_grad: bool) -> GroupedMatmulStrategy {
    if wgmma_enabled() && p.m >= 64 && p.k >= 64 && wgmma_supported::<R, f16>(client, p, weight_grad) {
        GroupedMatmulStrategy::Wgmma
    } else if cmma_pipelined_supported::<R, f16>(client, p) {
        match pipelined {
            // A manual-MMA default runs without it where the device lacks it.
            GroupedMatmulStrategy::CmmaPipelined { block_k, stages, wide, manual: true } if !cmma_pipelined_manual_supported::<R, f16>(client, p) => {
                GroupedMatmulStrategy::CmmaPipelined { block_k, stages, wide, manual: false }
            }
            other => other,
        }
    } else if cmma_supported::<R, f16>(client) {
        GroupedMatmulStrategy::Cmma
    } else {
        GroupedMatmulStrategy::Tiled
    }
}

fn auto_f16_cases<R: Runtime>(client: &ComputeClient<R>) {
    for counts in [vec![37, 0, 21, 5], vec![0, 130, 0]] {
        let rows = counts.iter().sum();
        for transpose in [true, false] {
            for (m, k) in [(96, 64), (100, 60), (34, 18)] {
                let ran = check(client, &counts, m, k, transpose, Storage::F16, GroupedMatmulStrategy::Auto).unwrap();
                assert_eq!(ran, expected_auto_f16(client, &GroupedMatmulProblem { rows, m, k, num_experts: counts.len(), transpose }, CMMA_PIPELINED_DEFAULT, false));
            }
        }
    }
    // f32 never takes the tensor-core kernel.
    assert_eq!(check(client, &[3, 4], 8, 8, true, Storage::F32, GroupedMatmulStrategy::Auto).unwrap(), GroupedMatmulStrategy::Tiled);
    wgmma_cases(client);
}

/// The Hopper kernel asked for by name: both layouts of `w`, ragged segments longer than a 128-row
/// tile, an output width that is not a multiple of its 256 columns, `k` not a multiple of its 64-deep
/// step (`w` read `[E, m, k]`; refused for `[E, k, m]`, which needs multiples of 64), and a refusal
/// naming what it needs where it cannot run (anything but CUDA on a Hopper GPU).
fn wgmma_cases<R: Runtime>(client: &ComputeClient<R>) {
    for (counts, m, k, transpose) in [
        (vec![37, 0, 21, 5], 96, 64, true),
        (vec![37, 0, 21, 5], 96, 64, false),
        (vec![0, 300, 0, 129], 136, 200, true),
        (vec![130, 2, 260], 264, 128, false),
    ] {
        let p = GroupedMatmulProblem { rows: counts.iter().sum(), m, k, num_experts: counts.len(), transpose };
        let res = check(client, &counts, m, k, transpose, Storage::F16, GroupedMatmulStrategy::Wgmma);
        if wgmma_supported::<R, f16>(client, &p, false) {
            assert_eq!(res.unwrap(), GroupedMatmulStrategy::Wgmma, "{p:?}");
        } else {
            let err = res.unwrap_err();
            assert!(matches!(err, KernelError::Unsupported(_)) && err.to_string().contains("Hopper"), "{p:?}: {err}");
        }
    }
    let res = check(client, &[37, 0, 21, 5], 96, 200, false, Storage::F16, GroupedMatmulStrategy::Wgmma);
    assert!(matches!(res, Err(KernelError::Unsupported(_))), "k = 200 with w as [E, k, m] must be refused: {res:?}");
}

/// Asking for tensor cores where they are missing is an error naming the types, not a wrong answer.
#[test]
fn cmma_grouped_matmul_runs_or_reports_unsupported() {
    cmma_cases(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

fn cmma_cases<R: Runtime>(client: &ComputeClient<R>) {
    let res = check(client, &[37, 0, 21], 100, 64, true, Storage::F16, GroupedMatmulStrategy::Cmma);
    if cmma_supported::<R, f16>(client) {
        assert_eq!(res.unwrap(), GroupedMatmulStrategy::Cmma);
    } else {
        let err = res.unwrap_err();
        assert!(matches!(err, KernelError::Unsupported(_)), "{err:?}");
        assert!(err.to_string().contains("cmma"), "{err}");
    }
    // f32 operands never run on the f16/bf16 tensor-core kernel.
    let res = check(client, &[4], 16, 16, true, Storage::F32, GroupedMatmulStrategy::Cmma);
    assert!(matches!(res, Err(KernelError::Unsupported(_))), "{res:?}");
}

/// The pipelined tensor-core kernels (cp.async + barriers: CUDA) either match the reference for
/// every configuration, ragged edges and empty experts included, or are refused with a typed error
/// where the runtime lacks them (lavapipe in CI); a configuration outside 32/64 × 2–4 is refused.
#[test]
fn pipelined_grouped_matmul_runs_or_reports_unsupported() {
    pipelined_cases(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

/// The pipelined configurations checked, `(block_k, stages, wide)`, each on the wmma path and with
/// manual MMA.
const PIPELINED_CONFIGS: [(usize, usize, bool); 8] =
    [(32, 2, false), (32, 3, false), (32, 4, false), (64, 2, false), (64, 3, false), (32, 4, true), (64, 2, true), (32, 3, true)];

fn pipelined_cases<R: Runtime>(client: &ComputeClient<R>) {
    for manual in [false, true] {
        pipelined_configs(client, manual);
    }
    let bad = GroupedMatmulStrategy::CmmaPipelined { block_k: 48, stages: 3, wide: false, manual: false };
    let err = check(client, &[8], 16, 16, true, Storage::F16, bad).unwrap_err();
    assert!(matches!(err, KernelError::Unsupported(_)) && err.to_string().contains("block_k 48"), "{err}");
}

/// Every [`PIPELINED_CONFIGS`] entry with the given `manual`: the forward in both weight layouts and
/// the weight gradient at ragged sizes (m = 136, k = 200, an empty expert) against the reference, or
/// refused with `Unsupported` where [`cmma_pipelined_supported`] (manual: [`cmma_pipelined_manual_supported`])
/// is false.
fn pipelined_configs<R: Runtime>(client: &ComputeClient<R>, manual: bool) {
    let supported = |p: &GroupedMatmulProblem| {
        if manual { cmma_pipelined_manual_supported::<R, f16>(client, p) } else { cmma_pipelined_supported::<R, f16>(client, p) }
    };
    for (block_k, stages, wide) in PIPELINED_CONFIGS {
        let strategy = GroupedMatmulStrategy::CmmaPipelined { block_k, stages, wide, manual };
        for transpose in [true, false] {
            let p = GroupedMatmulProblem { rows: 63, m: 136, k: 200, num_experts: 3, transpose };
            let res = check(client, &[37, 0, 26], 136, 200, transpose, Storage::F16, strategy);
            if supported(&p) {
                assert_eq!(res.unwrap(), strategy);
            } else {
                let err = res.unwrap_err();
                assert!(matches!(err, KernelError::Unsupported(_)), "{err:?}");
                assert!(err.to_string().contains("pipelined"), "{err}");
            }
        }
        let res = check_weight_grad(client, &[37, 0, 26], 136, 200, Storage::F16, strategy);
        if supported(&GroupedMatmulProblem { rows: 63, m: 136, k: 200, num_experts: 3, transpose: false }) {
            assert_eq!(res.unwrap(), strategy);
        } else {
            assert!(matches!(res, Err(KernelError::Unsupported(_))), "{res:?}");
        }
    }
}

#[test]
fn row_tiles_skip_empty_experts_and_split_long_segments() {
    let p = GroupedMatmulProblem { rows: 200, m: 4, k: 4, num_experts: 3, transpose: true };
    let offsets = [0, 70, 70, 200];
    p.validate(&offsets).unwrap();
    assert_eq!(p.row_tiles(&offsets, 64).unwrap(), vec![0, 0, 0, 64, 2, 70, 2, 134, 2, 198]);
    let empty = GroupedMatmulProblem { rows: 0, m: 4, k: 4, num_experts: 2, transpose: false };
    assert!(empty.row_tiles(&[0, 0, 0], 64).unwrap().is_empty());
}

/// The plain launcher (strategy `Auto`) keeps its contract: offsets are validated first.
#[test]
fn launcher_rejects_bad_offsets_before_launching() {
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    let p = GroupedMatmulProblem { rows: 5, m: 2, k: 3, num_experts: 2, transpose: true };
    let h = || client.create_from_slice(f32::as_bytes(&[0.0; 16]));
    let err = launch_grouped_matmul::<_, f32>(&client, &p, &[0, 2, 4], h(), h(), h(), h()).unwrap_err();
    assert!(matches!(err, KernelError::Shape(_)), "{err:?}");
}

/// Runs one weight gradient `dw[e] = dy[seg]ᵀ · x[seg]` and compares it with the f64 reference.
fn check_weight_grad<R: Runtime>(
    client: &ComputeClient<R>,
    counts: &[usize],
    m: usize,
    k: usize,
    storage: Storage,
    strategy: GroupedMatmulStrategy,
) -> Result<GroupedMatmulStrategy, KernelError> {
    let offsets = offsets_of(counts);
    let (e, rows) = (counts.len(), offsets[counts.len()]);
    let label = format!("weight grad counts={counts:?} m={m} k={k} {storage:?} {strategy:?}");
    let round = |v: Vec<f32>| storage.round(v);
    let dy = round(values(rows * m, (rows * 3 + m) as u64));
    let x = round(values(rows * k, (rows * 5 + k) as u64));
    let want = reference::grouped_matmul_weight_grad(&dy, &x, &offsets, m, k);
    let offs: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    let off_h = client.create_from_slice(u32::as_bytes(&offs));
    let problem = GroupedMatmulProblem { rows, m, k, num_experts: e, transpose: true };
    let n = e * m * k;
    let (ran, got) = match storage {
        Storage::F32 => {
            let up = |v: &[f32]| client.create_from_slice(f32::as_bytes(if v.is_empty() { &[0.0] } else { v }));
            let out = up(&vec![f32::NAN; n.max(1)]);
            let ran = launch_grouped_matmul_weight_grad_with::<R, f32>(client, &problem, &offsets, up(&dy), up(&x), off_h, out.clone(), strategy)?;
            (ran, f32::from_bytes(&client.read_one(out).expect("read back"))[..n].to_vec())
        }
        Storage::F16 => {
            let up = |v: &[f32]| {
                let h: Vec<f16> = if v.is_empty() { vec![f16::ZERO] } else { v.iter().map(|x| f16::from_f32(*x)).collect() };
                client.create_from_slice(f16::as_bytes(&h))
            };
            let out = up(&vec![f32::NAN; n.max(1)]);
            let ran = launch_grouped_matmul_weight_grad_with::<R, f16>(client, &problem, &offsets, up(&dy), up(&x), off_h, out.clone(), strategy)?;
            let bytes = client.read_one(out).expect("read back");
            (ran, f16::from_bytes(&bytes)[..n].iter().map(|v| v.to_f32()).collect())
        }
    };
    let tol = match storage {
        Storage::F32 => 1e-5,
        Storage::F16 => 2e-3,
    };
    assert!(got.iter().all(|v| v.is_finite()), "{label}: an output was not written");
    let err = max_rel(&got, &want);
    assert!(err < tol, "{label}: err {err} (bound {tol})");
    for (ex, c) in counts.iter().enumerate() {
        if *c == 0 {
            assert!(got[ex * m * k..(ex + 1) * m * k].iter().all(|v| *v == 0.0), "{label}: expert {ex} has no rows but a nonzero gradient");
        }
    }
    Ok(ran)
}

/// Tiled (and naive) weight gradients on the same segment layouts; the reduction runs over the
/// segment rows, so the layouts with several row tiles per expert and ragged ends matter here.
#[test]
fn tiled_weight_grad_matches_reference_on_wgpu() {
    weight_grad_cases(&cubecl::wgpu::WgpuRuntime::client(&Default::default()));
}

fn weight_grad_cases<R: Runtime>(client: &ComputeClient<R>) {
    for strategy in [GroupedMatmulStrategy::Tiled, GroupedMatmulStrategy::Naive] {
        for counts in layouts() {
            assert_eq!(check_weight_grad(client, &counts, 100, 60, Storage::F32, strategy).unwrap(), strategy);
        }
        check_weight_grad(client, &[5, 0, 3], 1, 1, Storage::F32, strategy).unwrap();
    }
    // `Auto` (the weight gradient reads dy and x row-major: support is asked for the untransposed
    // problem): Tiled without tensor cores (lavapipe), else a tensor-core kernel.
    let auto = expected_auto_f16(client, &GroupedMatmulProblem { rows: 63, m: 34, k: 18, num_experts: 4, transpose: false }, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT, true);
    assert_eq!(check_weight_grad(client, &[37, 0, 21, 5], 34, 18, Storage::F16, GroupedMatmulStrategy::Auto).unwrap(), auto);
    // The Hopper kernel where it runs (ragged segments, an empty expert, tails of 64-row steps),
    // else a refusal naming what it needs.
    let p = GroupedMatmulProblem { rows: 63, m: 96, k: 64, num_experts: 4, transpose: false };
    let res = check_weight_grad(client, &[37, 0, 21, 5], 96, 64, Storage::F16, GroupedMatmulStrategy::Wgmma);
    if wgmma_supported::<R, f16>(client, &p, true) {
        assert_eq!(res.unwrap(), GroupedMatmulStrategy::Wgmma);
        assert_eq!(check_weight_grad(client, &[0, 300, 0, 1], 136, 200, Storage::F16, GroupedMatmulStrategy::Wgmma).unwrap(), GroupedMatmulStrategy::Wgmma);
    } else {
        assert!(matches!(res, Err(KernelError::Unsupported(_))), "{res:?}");
    }
    let res = check_weight_grad(client, &[37, 0, 21], 64, 40, Storage::F16, GroupedMatmulStrategy::Cmma);
    if cmma_supported::<R, f16>(client) {
        assert_eq!(res.unwrap(), GroupedMatmulStrategy::Cmma);
    } else {
        assert!(matches!(res, Err(KernelError::Unsupported(_))), "{res:?}");
    }
}

/// The wgpu cases above on CUDA (`--features cuda`; needs an NVIDIA GPU): f32 tiled and naive, f16
/// through `Auto`, the tensor-core kernels (single-stage and every pipelined configuration), and
/// the weight gradients.
#[cfg(feature = "cuda")]
#[test]
fn grouped_matmul_kernels_match_reference_on_cuda() {
    let client = cubecl::cuda::CudaRuntime::client(&Default::default());
    f32_cases(&client, GroupedMatmulStrategy::Tiled);
    f32_cases(&client, GroupedMatmulStrategy::Naive);
    auto_f16_cases(&client);
    cmma_cases(&client);
    pipelined_cases(&client);
    weight_grad_cases(&client);
}

/// Only the manual-MMA pipelined kernels (`ldmatrix` + `mma.sync`) on CUDA at the ragged sizes of
/// [`pipelined_configs`] (also part of the test above; separate so that `manual_mma` selects them).
#[cfg(feature = "cuda")]
#[test]
fn manual_mma_pipelined_grouped_matmul_matches_reference_on_cuda() {
    let client = cubecl::cuda::CudaRuntime::client(&Default::default());
    let p = GroupedMatmulProblem { rows: 63, m: 136, k: 200, num_experts: 3, transpose: true };
    println!(
        "manual MMA supported on this device: {} (wmma pipelined: {})",
        cmma_pipelined_manual_supported::<_, f16>(&client, &p),
        cmma_pipelined_supported::<_, f16>(&client, &p)
    );
    pipelined_configs(&client, true);
}

/// The strategy names a benchmark or user passes (`moe_bench --pipelined`), and the checks on a
/// process-wide pipelined default: a bad configuration is refused before anything changes.
#[test]
fn strategy_names_parse_and_bad_pipelined_defaults_are_refused() {
    let parse = |s: &str| s.parse::<GroupedMatmulStrategy>();
    assert_eq!(parse("auto").unwrap(), GroupedMatmulStrategy::Auto);
    assert_eq!(parse("tiled").unwrap(), GroupedMatmulStrategy::Tiled);
    assert_eq!(parse("64x2").unwrap(), GroupedMatmulStrategy::CmmaPipelined { block_k: 64, stages: 2, wide: false, manual: false });
    assert_eq!(parse("32x4w").unwrap(), GroupedMatmulStrategy::CmmaPipelined { block_k: 32, stages: 4, wide: true, manual: false });
    assert_eq!(parse("64x2wm").unwrap(), GroupedMatmulStrategy::CmmaPipelined { block_k: 64, stages: 2, wide: true, manual: true });
    assert_eq!(parse("32x4m").unwrap(), GroupedMatmulStrategy::CmmaPipelined { block_k: 32, stages: 4, wide: false, manual: true });
    assert_eq!(parse("wgmma").unwrap(), GroupedMatmulStrategy::Wgmma);
    for name in ["auto", "naive", "tiled", "cmma", "wgmma", "64x2", "32x4w", "64x2wm", "32x4m"] {
        assert_eq!(parse(name).unwrap().to_string(), name, "Display reads back as FromStr's name");
    }
    for bad in ["48x2", "64x5", "64", "x2", "64x2ww", "64x2mw", "64x2mm", "48x2wm", "m", "fast"] {
        assert!(matches!(parse(bad), Err(KernelError::Unsupported(_))), "{bad} parsed");
    }
    let before = pipelined_defaults();
    assert_eq!(before, (CMMA_PIPELINED_DEFAULT, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT));
    let err = set_pipelined_defaults(Some((GroupedMatmulStrategy::Tiled, CMMA_PIPELINED_DEFAULT))).unwrap_err();
    assert!(err.to_string().contains("not a CmmaPipelined"), "{err}");
    let odd = GroupedMatmulStrategy::CmmaPipelined { block_k: 48, stages: 2, wide: true, manual: false };
    assert!(set_pipelined_defaults(Some((CMMA_PIPELINED_DEFAULT, odd))).is_err());
    assert_eq!(pipelined_defaults(), before, "a refused choice must leave the defaults as they were");
}
