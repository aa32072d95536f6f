//! Every kernel family of the crate on CUDA at Mixtral 8x7B sizes (d = 4096, ffn = 14336, E = 8,
//! k = 2) with T = 512 tokens (T·k = 1024 routed rows, uneven routing with one expert that receives
//! no row), in bf16 and in f32 storage, against f64 references on the same (bf16-rounded) inputs.
//!
//! Built only with `--features cuda`; meant to be compiled on a machine without a GPU and carried to
//! one (`bench/kernel_tests_gpu.sh`). Run it as
//! `cuda_mixtral --nocapture --test-threads 1 mixtral on_cuda host_`: every check prints its error,
//! so the log is the record. The filters select the Mixtral-size tests, the small-size CUDA twins of
//! the wgpu tests (`small_*::*_on_cuda`, compiled in from the other test files) and the `host_*`
//! tests; the other tests of those files use wgpu and are not meant for this run. Only `host_*`
//! tests run without a GPU.
//!
//! What is compared and how:
//! - permute: bit-exact against `reference::scatter::permute`.
//! - combine, SwiGLU forward/backward: the whole output against the crate references
//!   (`reference::scatter::combine`, `reference::swiglu`).
//! - grouped matmul (both weight layouts), its weight gradient, and the block-sparse SDD / DSD / DSᵀD
//!   (block 128): a full f64 reference of these products would take minutes of CPU time, so they are
//!   checked on a *sample*: 48 output rows spread over all expert segments, including the first and
//!   last row of every segment (for the block-sparse kernels: of every padded expert range, padding
//!   rows included), or, for the weight gradients, 6 `[e, j]` rows per expert (the empty expert's
//!   included). The sampled rows are computed by the small f64 helpers below, which implement the
//!   formulas of `reference::scatter` / `reference::blocksparse` (`host_sampled_helpers_match_the_crate_references`
//!   checks them against those references on small problems). In addition, every output is
//!   compared *in full* with the f32 tiled (or f32 block-sparse) kernel's output, which is itself
//!   within 1e-5 of the f64 reference on the sample; outputs are pre-filled with NaN, so a skipped
//!   element fails the check.
//!
//! Bounds, relative L2 (`‖got − want‖₂ / ‖want‖₂`): bf16 storage ≤ 1e-2 (expect ≈ 2–3e-3, the bf16
//! rounding of the outputs); f32 storage ≤ 1e-5; two f32 kernels against each other ≤ 2e-5.
//!
//! Grouped-matmul strategies: f32 `Naive` and `Tiled`; bf16 `Naive`, `Tiled`, `Cmma` and
//! `CmmaPipelined` {32,2}, {32,3}, {32,4}, {64,2}, {64,3}, the wide layout {32,4} and {64,2}, then `Auto`. A strategy the device does not
//! support (`cmma_supported` / `cmma_pipelined_supported`) must be refused with
//! `KernelError::Unsupported`; it is reported, and `Auto` must then have resolved to something else.
//! The `manual_mma_*` tests run the manual-MMA (`ldmatrix` + `mma.sync`) pipelined kernels the
//! same way (`64x2wm`, `32x4wm`, `64x2m`, `32x4m`; refused unless `cmma_pipelined_manual_supported`),
//! against the same references; filter `manual_mma` runs only them (and the small-size CUDA twin).
//!
//! Block-sparse strategies: f32 `Naive` (what `Auto` is for f32); bf16 `Naive`, the tensor-core
//! `CmmaPipelined` {32,4} and {64,2}, both also wide, then `Auto` (the tensor-core default where
//! `block_sparse_cmma_supported`, else `Naive`); every line names the strategy and what ran. An
//! unsupported tensor-core choice must be refused with `BlockSparseError::Kernel(KernelError::Unsupported)`.
#![cfg(feature = "cuda")]
// The test files included below as `small_*` each load tests/common themselves.
#![allow(clippy::duplicate_mod)]

use std::sync::Mutex;

use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::bf16;
use kernels_cubecl::RoutingPlan;
use kernels_cubecl::blocksparse::{
    BLOCK_SPARSE_CMMA_DEFAULT, BLOCK_SPARSE_CMMA_WEIGHT_GRAD_DEFAULT, BlockSparseError, BlockSparseProblem, BlockSparseStrategy,
    BlockSparseTopology, TopologyBuffers, block_sparse_cmma_supported, launch_dsd_with, launch_dstd_with, launch_sdd_with,
};
use kernels_cubecl::reference::blocksparse as bs_ref;
use kernels_cubecl::reference::scatter as scatter_ref;
use kernels_cubecl::reference::swiglu as swiglu_ref;
use kernels_cubecl::scatter::{
    CMMA_PIPELINED_DEFAULT, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT, GroupedMatmulProblem, GroupedMatmulStrategy as Strategy, KernelError, cmma_pipelined_manual_supported, cmma_pipelined_supported,
    cmma_supported, launch_combine, wgmma_enabled, wgmma_supported, launch_grouped_matmul_weight_grad_with, launch_grouped_matmul_with, launch_permute,
};
use kernels_cubecl::swiglu::{launch_swiglu, launch_swiglu_backward};

#[allow(dead_code)]
mod common;

// The small-size CUDA twins of the wgpu test files (their `*_on_cuda` tests, full references),
// compiled into this binary too so that one carried executable runs everything. These modules also
// bring their wgpu and host tests along: run this binary with the filters `mixtral on_cuda host_`
// (as bench/kernel_tests_gpu.sh does) to run only the CUDA and host tests.
#[path = "attention.rs"]
mod small_attention;
#[path = "blocksparse.rs"]
mod small_blocksparse;
#[path = "grouped_gemm.rs"]
mod small_grouped_gemm;
#[path = "scatter.rs"]
mod small_scatter;
#[path = "swiglu.rs"]
mod small_swiglu;

type R = CudaRuntime;

/// Model width.
const D: usize = 4096;
/// Expert hidden width.
const FFN: usize = 14336;
/// Experts.
const E: usize = 8;
/// Experts per token.
const TOP_K: usize = 2;
/// Tokens.
const T: usize = 512;
/// Block size of the block-sparse kernels.
const BLOCK: usize = 128;
/// The expert that no token is routed to.
const STARVED: usize = 5;
/// Relative L2 bound with bf16 storage.
const BF16_BOUND: f64 = 1e-2;
/// Relative L2 bound with f32 storage.
const F32_BOUND: f64 = 1e-5;
/// Relative L2 bound between two f32 kernels (each within [`F32_BOUND`] of the exact result).
const F32_PAIR_BOUND: f64 = 2e-5;
/// Sampled rows spread evenly over all rows, besides the first and last row of every segment.
const SPREAD: usize = 34;
/// Elements per chunk of the host-side parallel loops.
const CHUNK: usize = 1 << 20;

/// The block-sparse strategies run with bf16 storage.
const BF16_BLOCK_SPARSE_STRATEGIES: [BlockSparseStrategy; 6] = [
    BlockSparseStrategy::Naive,
    BlockSparseStrategy::CmmaPipelined { block_k: 32, stages: 4, wide: false },
    BlockSparseStrategy::CmmaPipelined { block_k: 64, stages: 2, wide: false },
    BlockSparseStrategy::CmmaPipelined { block_k: 32, stages: 4, wide: true },
    BlockSparseStrategy::CmmaPipelined { block_k: 64, stages: 2, wide: true },
    BlockSparseStrategy::Auto,
];

/// The grouped-matmul strategies run with bf16 storage.
const BF16_STRATEGIES: [Strategy; 11] = [
    Strategy::Naive,
    Strategy::Tiled,
    Strategy::Cmma,
    Strategy::CmmaPipelined { block_k: 32, stages: 2, wide: false, manual: false },
    Strategy::CmmaPipelined { block_k: 32, stages: 3, wide: false, manual: false },
    Strategy::CmmaPipelined { block_k: 32, stages: 4, wide: false, manual: false },
    Strategy::CmmaPipelined { block_k: 64, stages: 2, wide: false, manual: false },
    Strategy::CmmaPipelined { block_k: 64, stages: 3, wide: false, manual: false },
    Strategy::CmmaPipelined { block_k: 32, stages: 4, wide: true, manual: false },
    Strategy::CmmaPipelined { block_k: 64, stages: 2, wide: true, manual: false },
    Strategy::Auto,
];

/// The manual-MMA (`ldmatrix` + `mma.sync`) pipelined strategies, run with bf16 storage by the
/// `manual_mma_*` tests: the layer defaults' configurations (64 × 2 and 32 × 4, wide) and the same on
/// the default plane layout.
const BF16_MANUAL_STRATEGIES: [Strategy; 4] = [
    Strategy::CmmaPipelined { block_k: 64, stages: 2, wide: true, manual: true },
    Strategy::CmmaPipelined { block_k: 32, stages: 4, wide: true, manual: true },
    Strategy::CmmaPipelined { block_k: 64, stages: 2, wide: false, manual: true },
    Strategy::CmmaPipelined { block_k: 32, stages: 4, wide: false, manual: true },
];

// ---------------------------------------------------------------------------------------------
// Client, storage types, host helpers
// ---------------------------------------------------------------------------------------------

/// The CUDA client of device 0, with a panic message that says what is missing when it cannot be
/// created (no driver, no GPU, no NVRTC).
fn client() -> ComputeClient<R> {
    let made = std::panic::catch_unwind(|| {
        let client = R::client(&CudaDevice { index: 0 });
        // The properties come from the initialised device: this forces initialisation here.
        let _ = client.properties().hardware.plane_size_max;
        client
    });
    match made {
        Ok(client) => client,
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            panic!(
                "cuda_mixtral: cannot create the CubeCL CUDA client for CudaDevice {{ index: 0 }}: {why} (the cause, \
                 if the device thread panicked, is printed above). These tests need an NVIDIA GPU with its driver (libcuda.so) and NVRTC (libnvrtc.so) on the \
                 library path; only the host_* tests run without one."
            )
        }
    }
}

/// A storage type of the kernels: f32 or bf16.
trait Elem: Float + CubeElement + Copy + Send + Sync {
    const NAME: &'static str;
    /// Relative L2 bound against an f64 reference.
    const BOUND: f64;
    fn of_f32(v: f32) -> Self;
    fn to_f32_value(self) -> f32;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    const BOUND: f64 = F32_BOUND;
    fn of_f32(v: f32) -> Self {
        v
    }
    fn to_f32_value(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    const BOUND: f64 = BF16_BOUND;
    fn of_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32_value(self) -> f32 {
        self.to_f32()
    }
}

/// Runs `f(chunk index, chunk)` over `chunk`-sized pieces of `data` on all cores.
fn par_chunks<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let work = Mutex::new(data.chunks_mut(chunk).enumerate());
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let (work, f) = (&work, &f);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(move || {
                loop {
                    let next = work.lock().unwrap().next();
                    let Some((i, c)) = next else { break };
                    f(i, c);
                }
            });
        }
    });
}

/// `[f(0), …, f(n − 1)]`, computed on all cores.
fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    par_chunks(&mut out, 1, |i, slot| slot[0] = Some(f(i)));
    out.into_iter().map(|v| v.expect("filled")).collect()
}

/// `n` deterministic values in `[-scale, scale)`, rounded to bf16 so that the f32 and the bf16
/// runs see the same numbers.
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; n];
    par_chunks(&mut out, CHUNK, |i, c| {
        let v = common::values(c.len(), seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        for (o, x) in c.iter_mut().zip(v) {
            *o = bf16::from_f32(x * scale).to_f32();
        }
    });
    out
}

fn upload<S: Elem>(client: &ComputeClient<R>, v: &[f32]) -> Handle {
    let mut s = vec![S::of_f32(0.0); v.len().max(1)];
    par_chunks(&mut s[..v.len()], CHUNK, |i, c| {
        for (o, x) in c.iter_mut().zip(&v[i * CHUNK..]) {
            *o = S::of_f32(*x);
        }
    });
    client.create_from_slice(S::as_bytes(&s))
}

fn upload_u32(client: &ComputeClient<R>, v: &[usize]) -> Handle {
    let v: Vec<u32> = v.iter().map(|&x| u32::try_from(x).expect("index fits in u32")).collect();
    client.create_from_slice(u32::as_bytes(if v.is_empty() { &[0] } else { &v }))
}

/// A device buffer of `n` NaNs: an element a kernel does not write stays NaN and fails the checks.
fn nan_buffer<S: Elem>(client: &ComputeClient<R>, n: usize) -> Handle {
    client.create_from_slice(S::as_bytes(&vec![S::of_f32(f32::NAN); n.max(1)]))
}

fn read<S: Elem>(client: &ComputeClient<R>, h: Handle, n: usize) -> Vec<f32> {
    let bytes = client.read_one(h).expect("read back");
    let s = &S::from_bytes(&bytes)[..n];
    let mut out = vec![0f32; n];
    par_chunks(&mut out, CHUNK, |i, c| {
        for (o, x) in c.iter_mut().zip(&s[i * CHUNK..]) {
            *o = x.to_f32_value();
        }
    });
    out
}

/// `‖got − want‖₂ / ‖want‖₂` in f64; NaN when `got` holds a NaN (which fails every `<=` bound).
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared lengths");
    let parts = par_map(got.len().div_ceil(CHUNK), |i| {
        let (a, b) = (&got[i * CHUNK..((i + 1) * CHUNK).min(got.len())], &want[i * CHUNK..((i + 1) * CHUNK).min(want.len())]);
        a.iter().zip(b).fold((0f64, 0f64), |(num, den), (&x, &y)| {
            let diff = x as f64 - y as f64;
            (num + diff * diff, den + y as f64 * y as f64)
        })
    });
    let (num, den) = parts.into_iter().fold((0.0, 0.0), |(n, d), (a, b)| (n + a, d + b));
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// Asserts `err <= bound` (NaN fails) after printing the line.
fn report(what: &str, err: f64, bound: f64) {
    let ok = err <= bound;
    println!("{what}: rel L2 {err:.3e} (bound {bound:.0e}) {}", if ok { "ok" } else { "FAIL" });
    assert!(ok, "{what}: rel L2 {err:e} exceeds {bound:e}");
}

/// Every element finite: outputs start as NaN, so this fails on an element the kernel skipped.
fn assert_finite(what: &str, v: &[f32]) {
    let bad = par_map(v.len().div_ceil(CHUNK), |i| {
        let start = i * CHUNK;
        v[start..(start + CHUNK).min(v.len())].iter().position(|x| !x.is_finite()).map(|p| start + p)
    });
    if let Some(p) = bad.into_iter().flatten().next() {
        panic!("{what}: element {p} is {} (not written, or overflow)", v[p]);
    }
}

// ---------------------------------------------------------------------------------------------
// Routing and sampling
// ---------------------------------------------------------------------------------------------

/// Top-2 routing of the T tokens from random scores plus a per-expert bias (uneven loads: a hot
/// expert, cold ones), never choosing [`STARVED`].
fn mixtral_plan() -> RoutingPlan {
    const BIAS: [f32; E] = [0.8, 0.4, 0.1, 0.0, -0.2, 0.0, -0.5, 0.25];
    let r = common::values(T * E, 2024);
    let mut idx = Vec::with_capacity(T * TOP_K);
    for t in 0..T {
        let score = |e: usize| r[t * E + e] + BIAS[e];
        let mut order: Vec<usize> = (0..E).filter(|&e| e != STARVED).collect();
        order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
        idx.extend(order[..TOP_K].iter().map(|&e| e as i64));
    }
    RoutingPlan::from_expert_indices(&idx, TOP_K, E).expect("valid routing")
}

/// The expert whose segment holds `row`.
fn expert_of(offsets: &[usize], row: usize) -> usize {
    (0..offsets.len() - 1).find(|&e| row >= offsets[e] && row < offsets[e + 1]).expect("row inside a segment")
}

/// Sampled rows: first and last row of every non-empty segment plus [`SPREAD`] rows spread evenly
/// over all rows; ascending, no duplicates.
fn sample_rows(offsets: &[usize]) -> Vec<usize> {
    let rows = offsets[offsets.len() - 1];
    let mut s: Vec<usize> = offsets.windows(2).filter(|w| w[1] > w[0]).flat_map(|w| [w[0], w[1] - 1]).collect();
    s.extend((0..SPREAD).map(|i| i * (rows - 1) / (SPREAD - 1)));
    s.sort_unstable();
    s.dedup();
    s
}

/// Sampled `[e, j]` rows of a weight gradient `[E, m, ·]`: `j` = 0, m − 1 and four between, for
/// every expert (the one without rows included).
fn sample_weight_rows(experts: usize, m: usize) -> Vec<(usize, usize)> {
    (0..experts).flat_map(|e| (0..6).map(move |q| (e, (q * (m - 1) / 5 + if q == 0 || q == 5 { 0 } else { e }).min(m - 1)))).collect()
}

fn gather_rows(v: &[f32], rows: &[usize], width: usize) -> Vec<f32> {
    rows.iter().flat_map(|&r| v[r * width..(r + 1) * width].iter().copied()).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

// ---------------------------------------------------------------------------------------------
// Sampled f64 references (the formulas of src/reference/)
// ---------------------------------------------------------------------------------------------

/// Rows `rows` of `reference::scatter::grouped_matmul(x, w, offsets, m, k, transpose)`, `[rows.len(), m]`.
fn grouped_matmul_rows(x: &[f32], w: &[f32], offsets: &[usize], rows: &[usize], m: usize, k: usize, transpose: bool) -> Vec<f32> {
    par_map(rows.len(), |s| {
        let (i, e) = (rows[s], expert_of(offsets, rows[s]));
        let xr = &x[i * k..(i + 1) * k];
        if transpose {
            (0..m).map(|j| dot(xr, &w[(e * m + j) * k..(e * m + j + 1) * k]) as f32).collect::<Vec<_>>()
        } else {
            // Row-major walk over w[e] ([k, m]): the same sum, in a cache-friendly order.
            let mut acc = vec![0f64; m];
            for (l, &xv) in xr.iter().enumerate() {
                for (a, &wv) in acc.iter_mut().zip(&w[(e * k + l) * m..(e * k + l + 1) * m]) {
                    *a += xv as f64 * wv as f64;
                }
            }
            acc.into_iter().map(|a| a as f32).collect()
        }
    })
    .concat()
}

/// Rows `pairs` (`[e, j]`) of `reference::scatter::grouped_matmul_weight_grad(dy, x, offsets, m, k)`,
/// `[pairs.len(), k]`.
fn weight_grad_rows(dy: &[f32], x: &[f32], offsets: &[usize], pairs: &[(usize, usize)], m: usize, k: usize) -> Vec<f32> {
    par_map(pairs.len(), |p| {
        let (e, j) = pairs[p];
        let mut acc = vec![0f64; k];
        for i in offsets[e]..offsets[e + 1] {
            let g = dy[i * m + j] as f64;
            for (a, &xv) in acc.iter_mut().zip(&x[i * k..(i + 1) * k]) {
                *a += g * xv as f64;
            }
        }
        acc.into_iter().map(|a| a as f32).collect::<Vec<_>>()
    })
    .concat()
}

/// Index of the weight element of expert `e`, hidden unit `c`, other coordinate `o`:
/// `w[e, c, o]` (`ffn_major`, `[E, F, O]`) or `w[e, o, c]` (`[E, O, F]`).
fn weight_index(e: usize, c: usize, o: usize, ffn: usize, other: usize, ffn_major: bool) -> usize {
    if ffn_major { (e * ffn + c) * other + o } else { (e * other + o) * ffn + c }
}

/// Positions in the SDD output (`[nnz, bs, bs]`) of padded row `r`, in block-CSR order.
fn sdd_row_positions(topo: &BlockSparseTopology, r: usize) -> Vec<usize> {
    let bs = topo.block();
    let i = r / bs;
    (topo.row_offsets()[i]..topo.row_offsets()[i + 1]).flat_map(|b| (0..bs).map(move |c| (b * bs + r % bs) * bs + c)).collect()
}

/// `(expert, hidden unit)` of every position of padded row `r` (order of [`sdd_row_positions`]);
/// the hidden unit is `≥ F` for a padded column.
fn row_columns(topo: &BlockSparseTopology, r: usize) -> Vec<(usize, usize)> {
    let bs = topo.block();
    let i = r / bs;
    (topo.row_offsets()[i]..topo.row_offsets()[i + 1])
        .flat_map(|b| (0..bs).map(move |c| topo.column_indices()[b] * bs + c))
        .map(|n| (n / topo.ffn_padded(), n % topo.ffn_padded()))
        .collect()
}

/// Padded row `r` of `reference::blocksparse::sdd(topo, x, w, k, transpose)`, in the order of
/// [`sdd_row_positions`] (padded columns 0).
fn sdd_row(topo: &BlockSparseTopology, x: &[f32], w: &[f32], k: usize, r: usize, transpose: bool) -> Vec<f32> {
    let f = topo.ffn();
    let xr = &x[r * k..(r + 1) * k];
    let cols = row_columns(topo, r);
    if transpose {
        cols.iter().map(|&(e, cc)| if cc < f { dot(xr, &w[weight_index(e, cc, 0, f, k, true)..][..k]) as f32 } else { 0.0 }).collect()
    } else {
        // w: [E, K, F]; walking l outside keeps the reads of w contiguous.
        let mut acc = vec![0f64; cols.len()];
        for (l, &xv) in xr.iter().enumerate() {
            for (a, &(e, cc)) in acc.iter_mut().zip(&cols) {
                if cc < f {
                    *a += xv as f64 * w[weight_index(e, cc, l, f, k, false)] as f64;
                }
            }
        }
        acc.into_iter().map(|a| a as f32).collect()
    }
}

/// Padded row `r` of `reference::blocksparse::dsd(topo, s, w, m, transpose)`, `[m]`.
fn dsd_row(topo: &BlockSparseTopology, s: &[f32], w: &[f32], m: usize, r: usize, transpose: bool) -> Vec<f32> {
    let f = topo.ffn();
    // (sparse value, expert, hidden unit) of every real column of the row.
    let entries: Vec<(f64, usize, usize)> = sdd_row_positions(topo, r)
        .into_iter()
        .zip(row_columns(topo, r))
        .filter(|(_, (_, cc))| *cc < f)
        .map(|(p, (e, cc))| (s[p] as f64, e, cc))
        .collect();
    let mut acc = vec![0f64; m];
    if transpose {
        // w: [E, M, F]; for each output o the hidden units are contiguous.
        for (o, a) in acc.iter_mut().enumerate() {
            *a = entries.iter().map(|&(sv, e, cc)| sv * w[weight_index(e, cc, o, f, m, false)] as f64).sum();
        }
    } else {
        for &(sv, e, cc) in &entries {
            for (a, &wv) in acc.iter_mut().zip(&w[weight_index(e, cc, 0, f, m, true)..][..m]) {
                *a += sv * wv as f64;
            }
        }
    }
    acc.into_iter().map(|a| a as f32).collect()
}

/// Row `[e, c, ·]` (`m` values) of `reference::blocksparse::dstd(topo, s, d, m, transpose_out)`:
/// `Σ_r s[r, e·Fp + c] · d[r, ·]` over expert `e`'s padded rows.
fn dstd_row(topo: &BlockSparseTopology, s: &[f32], d: &[f32], m: usize, e: usize, c: usize) -> Vec<f32> {
    let bs = topo.block();
    let n = e * topo.ffn_padded() + c;
    let (j, cb) = (n / bs, n % bs);
    let mut acc = vec![0f64; m];
    for r in topo.expert_rows(e) {
        let i = r / bs;
        let b = (topo.row_offsets()[i]..topo.row_offsets()[i + 1])
            .find(|&b| topo.column_indices()[b] == j)
            .expect("an expert's row blocks hold all of its column blocks");
        let sv = s[(b * bs + r % bs) * bs + cb] as f64;
        for (a, &dv) in acc.iter_mut().zip(&d[r * m..(r + 1) * m]) {
            *a += sv * dv as f64;
        }
    }
    acc.into_iter().map(|a| a as f32).collect()
}

/// Positions of row `[e, c, ·]` of the DSᵀD output (`[E, F, m]`, or `[E, m, F]` when `transpose`).
fn dstd_row_positions(ffn: usize, m: usize, e: usize, c: usize, transpose: bool) -> Vec<usize> {
    (0..m).map(|o| if transpose { (e * m + o) * ffn + c } else { (e * ffn + c) * m + o }).collect()
}

/// Sorted tokens padded per expert with zero rows, `[Tp, D]`.
fn padded_x(plan: &RoutingPlan, topo: &BlockSparseTopology, x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; topo.rows() * D];
    for e in 0..E {
        for r in 0..plan.counts[e] {
            let t = plan.sorted_token[plan.offsets[e] + r];
            let row = topo.padded_offsets()[e] + r;
            out[row * D..(row + 1) * D].copy_from_slice(&x[t * D..(t + 1) * D]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Strategy bookkeeping
// ---------------------------------------------------------------------------------------------

/// What `Auto` must resolve to for `S` on this device (`support` as in `resolve_strategy`).
fn expected_auto<S: Elem>(client: &ComputeClient<R>, support: &GroupedMatmulProblem, pipelined: Strategy, weight_grad: bool) -> Strategy {
    if wgmma_enabled() && support.m >= 64 && support.k >= 64 && wgmma_supported::<R, S>(client, support, weight_grad) {
        Strategy::Wgmma
    } else if cmma_pipelined_supported::<R, S>(client, support) {
        pipelined
    } else if cmma_supported::<R, S>(client) {
        Strategy::Cmma
    } else {
        Strategy::Tiled
    }
}

fn strategy_supported<S: Elem>(client: &ComputeClient<R>, support: &GroupedMatmulProblem, strategy: Strategy, weight_grad: bool) -> bool {
    match strategy {
        Strategy::Wgmma => wgmma_supported::<R, S>(client, support, weight_grad),
        Strategy::Cmma => cmma_supported::<R, S>(client),
        Strategy::CmmaPipelined { manual: true, .. } => cmma_pipelined_manual_supported::<R, S>(client, support),
        Strategy::CmmaPipelined { .. } => cmma_pipelined_supported::<R, S>(client, support),
        _ => true,
    }
}

/// Runs `strategies` for storage `S` through `run` (→ the strategy that ran and the
/// full output), checking each on the sample (`sample(out)` against `want`) and in full against
/// `full` (the f32 tiled output) when given. Returns the full output of the first strategy.
#[allow(clippy::too_many_arguments)]
fn check_strategies<S: Elem>(
    what: &str,
    client: &ComputeClient<R>,
    support: &GroupedMatmulProblem,
    pipelined: Strategy,
    weight_grad: bool,
    strategies: &[Strategy],
    run: &dyn Fn(Strategy) -> Result<(Strategy, Vec<f32>), KernelError>,
    sample: &dyn Fn(&[f32]) -> Vec<f32>,
    want: &[f32],
    full: Option<&[f32]>,
    extra: &dyn Fn(&str, &[f32]),
) -> Option<Vec<f32>> {
    let mut first = None;
    let mut unsupported = Vec::new();
    let auto = expected_auto::<S>(client, support, pipelined, weight_grad);
    for &strategy in strategies {
        let label = format!("{what} {} {strategy:?}", S::NAME);
        if strategy != Strategy::Auto && !strategy_supported::<S>(client, support, strategy, weight_grad) {
            let res = run(strategy);
            assert!(matches!(res, Err(KernelError::Unsupported(_))), "{label}: unsupported on this device but not refused: {:?}", res.map(|r| r.0));
            println!("{label}: UNSUPPORTED on this device (refused: {})", res.err().map(|e| e.to_string()).unwrap_or_default());
            unsupported.push(strategy);
            continue;
        }
        let (ran, out) = run(strategy).unwrap_or_else(|e| panic!("{label}: {e}"));
        let expected = if strategy == Strategy::Auto { auto } else { strategy };
        assert_eq!(ran, expected, "{label}: ran {ran:?}");
        assert_finite(&label, &out);
        let bound = S::BOUND;
        report(&format!("{label} (ran {ran:?}) sampled vs f64 reference"), rel_l2(&sample(&out), want), bound);
        if let Some(full) = full {
            let pair = if S::NAME == "f32" { F32_PAIR_BOUND } else { BF16_BOUND };
            report(&format!("{label} (ran {ran:?}) full output vs f32 Tiled"), rel_l2(&out, full), pair);
        }
        extra(&label, &out);
        if first.is_none() {
            first = Some(out);
        }
    }
    assert!(!unsupported.contains(&auto), "{what} {}: Auto resolved to {auto:?}, which this device does not support", S::NAME);
    if !unsupported.is_empty() {
        println!("{what} {}: {} strategies unsupported on this device ({unsupported:?}); Auto resolved to {auto:?}", S::NAME, unsupported.len());
    }
    first
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Permute (bit-exact) and combine (full reference), f32 and bf16.
#[test]
fn permute_and_combine_match_reference_at_mixtral_sizes() {
    let client = client();
    let plan = mixtral_plan();
    println!("routing counts {:?} (expert {STARVED} starved)", plan.counts);
    let n = T * TOP_K;
    let rows: Vec<u32> = plan.sorted_token.iter().map(|&r| r as u32).collect();
    let x = random(T * D, 11, 1.0);
    let xs_want = scatter_ref::permute(&x, &rows, D);
    let y = random(n * D, 12, 1.0);
    let weights: Vec<f32> = random(n, 13, 1.0).into_iter().map(f32::abs).collect();
    let slots: Vec<u32> = plan.slots().into_iter().map(|s| s as u32).collect();
    let out_want = scatter_ref::combine(&y, &slots, &weights, TOP_K, D);
    fn run<S: Elem>(client: &ComputeClient<R>, plan: &RoutingPlan, x: &[f32], xs_want: &[f32], y: &[f32], weights: &[f32], out_want: &[f32]) {
        let n = T * TOP_K;
        let out = nan_buffer::<S>(client, n * D);
        launch_permute::<R, S, u32>(client, upload::<S>(client, x), T, upload_u32(client, &plan.sorted_token), n, D, out.clone());
        let got = read::<S>(client, out, n * D);
        let mismatches = got.iter().zip(xs_want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        println!("permute {} [{T}x{D}] -> [{n}x{D}]: {mismatches} elements differ from the reference (must be 0)", S::NAME);
        assert_eq!(mismatches, 0, "permute {}", S::NAME);

        let out = nan_buffer::<S>(client, T * D);
        let slots_h = upload_u32(client, &plan.slots());
        launch_combine::<R, S, u32>(client, upload::<S>(client, y), n, slots_h, upload::<S>(client, weights), T, TOP_K, D, out.clone());
        let got = read::<S>(client, out, T * D);
        assert_finite("combine", &got);
        report(&format!("combine {} [{n}x{D}] -> [{T}x{D}] vs reference", S::NAME), rel_l2(&got, out_want), S::BOUND);
    }
    run::<f32>(&client, &plan, &x, &xs_want, &y, &weights, &out_want);
    run::<bf16>(&client, &plan, &x, &xs_want, &y, &weights, &out_want);
}

/// One grouped matmul layout at Mixtral sizes: f32 Tiled (the full reference), then the f32
/// strategies `f32_others`, then the bf16 strategies `bf16`.
fn grouped_matmul_case(transpose: bool, f32_others: &[Strategy], bf16: &[Strategy]) {
    let client = client();
    let plan = mixtral_plan();
    let offsets = &plan.offsets;
    let n = offsets[E];
    // transpose: the up projection x · w1[e]ᵀ with w1 [E, F, d]; else the down projection h · w2[e]
    // with w2 stored [E, F, d] (= [E, k, m]).
    let (m, k) = if transpose { (FFN, D) } else { (D, FFN) };
    let what = format!("grouped matmul [{n}x{k}] x [{E}x{}] transpose={transpose}", if transpose { format!("{m}x{k}") } else { format!("{k}x{m}") });
    println!("{what}: counts {:?}", plan.counts);
    let problem = GroupedMatmulProblem { rows: n, m, k, num_experts: E, transpose };
    let x = random(n * k, 21 + transpose as u64, 1.0);
    let w = random(E * m * k, 23 + transpose as u64, 1.0);
    let rows = sample_rows(offsets);
    let want = grouped_matmul_rows(&x, &w, offsets, &rows, m, k, transpose);
    let sample = |out: &[f32]| gather_rows(out, &rows, m);
    let off_h = upload_u32(&client, offsets);
    let none = |_: &str, _: &[f32]| {};

    fn runner<'a, S: Elem>(
        client: &'a ComputeClient<R>,
        problem: &'a GroupedMatmulProblem,
        offsets: &'a [usize],
        x: Handle,
        w: Handle,
        off: Handle,
    ) -> impl Fn(Strategy) -> Result<(Strategy, Vec<f32>), KernelError> + 'a {
        move |strategy| {
            let len = problem.rows * problem.m;
            let out = nan_buffer::<S>(client, len);
            let ran = launch_grouped_matmul_with::<R, S>(client, problem, offsets, x.clone(), w.clone(), off.clone(), out.clone(), strategy)?;
            Ok((ran, read::<S>(client, out, len)))
        }
    }

    let full = {
        let run = runner::<f32>(&client, &problem, offsets, upload::<f32>(&client, &x), upload::<f32>(&client, &w), off_h.clone());
        let tiled = check_strategies::<f32>(&what, &client, &problem, CMMA_PIPELINED_DEFAULT, false, &[Strategy::Tiled], &run, &sample, &want, None, &none)
            .expect("f32 tiled ran");
        check_strategies::<f32>(&what, &client, &problem, CMMA_PIPELINED_DEFAULT, false, f32_others, &run, &sample, &want, Some(&tiled), &none);
        tiled
    };
    let run = runner::<bf16>(&client, &problem, offsets, upload::<bf16>(&client, &x), upload::<bf16>(&client, &w), off_h);
    check_strategies::<bf16>(&what, &client, &problem, CMMA_PIPELINED_DEFAULT, false, bf16, &run, &sample, &want, Some(&full), &none);
}

#[test]
fn grouped_matmul_up_projection_matches_reference_at_mixtral_sizes() {
    grouped_matmul_case(true, &[Strategy::Naive, Strategy::Auto], &BF16_STRATEGIES);
}

#[test]
fn grouped_matmul_down_projection_matches_reference_at_mixtral_sizes() {
    grouped_matmul_case(false, &[Strategy::Naive, Strategy::Auto], &BF16_STRATEGIES);
}

/// The up projection (`w1: [E, ffn, d]` read transposed: A `[row][k]`, B `[col][k]` in shared
/// memory) with [`BF16_MANUAL_STRATEGIES`].
#[test]
fn manual_mma_grouped_matmul_up_projection_matches_reference_at_mixtral_sizes() {
    grouped_matmul_case(true, &[], &BF16_MANUAL_STRATEGIES);
}

/// The down projection (`w2` as `[E, k, m]`: B staged `[k][col]`, the transposed `ldmatrix`).
#[test]
fn manual_mma_grouped_matmul_down_projection_matches_reference_at_mixtral_sizes() {
    grouped_matmul_case(false, &[], &BF16_MANUAL_STRATEGIES);
}

/// One weight-gradient shape `dw[e] = dy[seg]ᵀ · x[seg]` into `[E, m, k]`: f32 Tiled (the full
/// reference), the f32 strategies `f32_others`, then the bf16 strategies `bf16`.
fn weight_grad_case(m: usize, k: usize, f32_others: &[Strategy], bf16: &[Strategy]) {
    let client = client();
    let plan = mixtral_plan();
    let offsets = &plan.offsets;
    let n = offsets[E];
    let what = format!("weight grad [{n}x{m}]ᵀ x [{n}x{k}] -> [{E}x{m}x{k}]");
    println!("{what}: counts {:?}", plan.counts);
    let problem = GroupedMatmulProblem { rows: n, m, k, num_experts: E, transpose: true };
    // The launcher checks pipelined support on the row-major reading of dy and x.
    let support = GroupedMatmulProblem { transpose: false, ..problem };
    let dy = random(n * m, 31 + m as u64, 1.0);
    let x = random(n * k, 37 + k as u64, 1.0);
    let pairs = sample_weight_rows(E, m);
    let want = weight_grad_rows(&dy, &x, offsets, &pairs, m, k);
    let sample = |out: &[f32]| pairs.iter().flat_map(|&(e, j)| out[(e * m + j) * k..(e * m + j + 1) * k].iter().copied()).collect::<Vec<_>>();
    let starved_zero = |label: &str, out: &[f32]| {
        let slab = &out[STARVED * m * k..(STARVED + 1) * m * k];
        assert!(slab.iter().all(|v| *v == 0.0), "{label}: expert {STARVED} has no rows but a nonzero gradient");
    };
    let off_h = upload_u32(&client, offsets);

    fn runner<'a, S: Elem>(
        client: &'a ComputeClient<R>,
        problem: &'a GroupedMatmulProblem,
        offsets: &'a [usize],
        dy: Handle,
        x: Handle,
        off: Handle,
    ) -> impl Fn(Strategy) -> Result<(Strategy, Vec<f32>), KernelError> + 'a {
        move |strategy| {
            let len = problem.num_experts * problem.m * problem.k;
            let out = nan_buffer::<S>(client, len);
            let ran = launch_grouped_matmul_weight_grad_with::<R, S>(client, problem, offsets, dy.clone(), x.clone(), off.clone(), out.clone(), strategy)?;
            Ok((ran, read::<S>(client, out, len)))
        }
    }

    let full = {
        let run = runner::<f32>(&client, &problem, offsets, upload::<f32>(&client, &dy), upload::<f32>(&client, &x), off_h.clone());
        let tiled = check_strategies::<f32>(&what, &client, &support, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT, true, &[Strategy::Tiled], &run, &sample, &want, None, &starved_zero)
            .expect("f32 tiled ran");
        check_strategies::<f32>(&what, &client, &support, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT, true, f32_others, &run, &sample, &want, Some(&tiled), &starved_zero);
        tiled
    };
    let run = runner::<bf16>(&client, &problem, offsets, upload::<bf16>(&client, &dy), upload::<bf16>(&client, &x), off_h);
    check_strategies::<bf16>(&what, &client, &support, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT, true, bf16, &run, &sample, &want, Some(&full), &starved_zero);
}

/// `dW1 = dH[seg]ᵀ · X[seg]` (`[E, ffn, d]`).
#[test]
fn weight_grad_up_projection_matches_reference_at_mixtral_sizes() {
    weight_grad_case(FFN, D, &[Strategy::Naive, Strategy::Auto], &BF16_STRATEGIES);
}

/// `dW2 = dY[seg]ᵀ · H[seg]` (`[E, d, ffn]`, the PyTorch layout of w2).
#[test]
fn weight_grad_down_projection_matches_reference_at_mixtral_sizes() {
    weight_grad_case(D, FFN, &[Strategy::Naive, Strategy::Auto], &BF16_STRATEGIES);
}

/// `dW1` with [`BF16_MANUAL_STRATEGIES`] (both operands staged `[k][col]`: the transposed
/// `ldmatrix` for A and B; the empty expert must get zeros).
#[test]
fn manual_mma_weight_grad_up_projection_matches_reference_at_mixtral_sizes() {
    weight_grad_case(FFN, D, &[], &BF16_MANUAL_STRATEGIES);
}

/// `dW2` with [`BF16_MANUAL_STRATEGIES`].
#[test]
fn manual_mma_weight_grad_down_projection_matches_reference_at_mixtral_sizes() {
    weight_grad_case(D, FFN, &[], &BF16_MANUAL_STRATEGIES);
}

/// The Hopper kernel (`wgmma` + TMA) for the up projection (`w1` read `[E, ffn, d]`: both operands
/// K-major); refused with a reason elsewhere.
#[test]
fn wgmma_grouped_matmul_up_projection_matches_reference_at_mixtral_sizes() {
    grouped_matmul_case(true, &[], &[Strategy::Wgmma, Strategy::Auto]);
}

/// The down projection (`w2` as `[E, k, m]`: the weight MN-major).
#[test]
fn wgmma_grouped_matmul_down_projection_matches_reference_at_mixtral_sizes() {
    grouped_matmul_case(false, &[], &[Strategy::Wgmma, Strategy::Auto]);
}

/// `dW1` on the Hopper kernel (both operands MN-major; ragged segment tails zeroed in shared
/// memory; the empty expert must get zeros).
#[test]
fn wgmma_weight_grad_up_projection_matches_reference_at_mixtral_sizes() {
    weight_grad_case(FFN, D, &[], &[Strategy::Wgmma, Strategy::Auto]);
}

/// `dW2` on the Hopper kernel.
#[test]
fn wgmma_weight_grad_down_projection_matches_reference_at_mixtral_sizes() {
    weight_grad_case(D, FFN, &[], &[Strategy::Wgmma, Strategy::Auto]);
}

/// SwiGLU forward and backward over the `[T·k, ffn]` activations, against the full reference.
#[test]
fn swiglu_matches_reference_at_mixtral_sizes() {
    let client = client();
    let len = T * TOP_K * FFN;
    let (g, u, d) = (random(len, 41, 6.0), random(len, 42, 2.0), random(len, 43, 1.0));
    let h_want = swiglu_ref::swiglu(&g, &u);
    let (dg_want, du_want) = swiglu_ref::swiglu_backward(&g, &u, &d);
    fn run<S: Elem>(client: &ComputeClient<R>, g: &[f32], u: &[f32], d: &[f32], want: [&[f32]; 3]) {
        let len = g.len();
        let (gh, uh, dh) = (upload::<S>(client, g), upload::<S>(client, u), upload::<S>(client, d));
        let h = nan_buffer::<S>(client, len);
        launch_swiglu::<R, S>(client, len, gh.clone(), uh.clone(), h.clone()).unwrap();
        let (dg, du) = (nan_buffer::<S>(client, len), nan_buffer::<S>(client, len));
        launch_swiglu_backward::<R, S>(client, len, gh, uh, dh, dg.clone(), du.clone()).unwrap();
        for ((name, out), want) in [("h", h), ("d_gate", dg), ("d_up", du)].into_iter().zip(want) {
            let got = read::<S>(client, out, len);
            assert_finite(name, &got);
            report(&format!("swiglu {} [{}x{FFN}] {name} vs reference", S::NAME, T * TOP_K), rel_l2(&got, want), S::BOUND);
        }
    }
    run::<f32>(&client, &g, &u, &d, [&h_want, &dg_want, &du_want]);
    run::<bf16>(&client, &g, &u, &d, [&h_want, &dg_want, &du_want]);
}

/// Block-sparse SDD, DSD and DSᵀD with block 128, both weight orientations: f32 with the
/// one-element kernels, then bf16 through [`BF16_BLOCK_SPARSE_STRATEGIES`] (the one-element and the
/// tensor-core kernels), each on the sample against the f64 reference and in full against the f32
/// kernel's output.
#[test]
fn block_sparse_matches_reference_at_mixtral_sizes() {
    let client = client();
    let plan = mixtral_plan();
    let topo = BlockSparseTopology::for_experts(&plan.counts, FFN, BLOCK).expect("topology");
    let bufs = TopologyBuffers::upload(&client, &topo).expect("topology fits in u32");
    let (rows, nnz_len) = (topo.rows(), topo.sparse_len());
    let support = BlockSparseProblem::for_topology(&topo, D, true);
    let cmma = block_sparse_cmma_supported::<R, bf16>(&client, &support);
    println!(
        "block-sparse: counts {:?}, padded offsets {:?}, Tp = {rows}, nnz = {} blocks of {BLOCK}x{BLOCK}; bf16 tensor-core path supported: {cmma}",
        plan.counts,
        topo.padded_offsets(),
        topo.nnz()
    );
    let x = padded_x(&plan, &topo, &random(T * D, 51, 1.0));
    let w = random(E * FFN * D, 52, 1.0); // [E, F, d] or [E, d, F]: same element count
    let s = random(nnz_len, 53, 1.0);
    let dout = random(rows * D, 54, 1.0);
    // Sampled padded rows: first and last of every expert range (the last is padding where the
    // count is not a multiple of the block), the first padding row, and rows spread over all.
    let mut prow = Vec::new();
    for e in 0..E {
        let r = topo.expert_rows(e);
        if !r.is_empty() {
            prow.extend([r.start, r.end - 1, (r.start + plan.counts[e]).min(r.end - 1)]);
        }
    }
    prow.extend((0..SPREAD).map(|i| i * (rows - 1) / (SPREAD - 1)));
    prow.sort_unstable();
    prow.dedup();
    let pairs = sample_weight_rows(E, FFN);

    struct Handles {
        x: Handle,
        w: Handle,
        s: Handle,
        dout: Handle,
    }
    let up = |f32_storage: bool| {
        let u = |v: &[f32]| if f32_storage { upload::<f32>(&client, v) } else { upload::<bf16>(&client, v) };
        Handles { x: u(&x), w: u(&w), s: u(&s), dout: u(&dout) }
    };
    let (hf, hb) = (up(true), up(false));

    type Ran = Result<(BlockSparseStrategy, Vec<f32>), BlockSparseError>;
    fn sdd<S: Elem>(client: &ComputeClient<R>, topo: &BlockSparseTopology, bufs: &TopologyBuffers, h: &Handles, transpose: bool, strategy: BlockSparseStrategy) -> Ran {
        let problem = BlockSparseProblem::for_topology(topo, D, transpose);
        let out = nan_buffer::<S>(client, topo.sparse_len());
        let ran = launch_sdd_with::<R, S>(client, &problem, topo, bufs, h.x.clone(), h.w.clone(), out.clone(), strategy)?;
        Ok((ran, read::<S>(client, out, topo.sparse_len())))
    }
    fn dsd<S: Elem>(client: &ComputeClient<R>, topo: &BlockSparseTopology, bufs: &TopologyBuffers, h: &Handles, transpose: bool, strategy: BlockSparseStrategy) -> Ran {
        let problem = BlockSparseProblem::for_topology(topo, D, transpose);
        let out = nan_buffer::<S>(client, topo.rows() * D);
        let ran = launch_dsd_with::<R, S>(client, &problem, topo, bufs, h.s.clone(), h.w.clone(), out.clone(), strategy)?;
        Ok((ran, read::<S>(client, out, topo.rows() * D)))
    }
    fn dstd<S: Elem>(client: &ComputeClient<R>, topo: &BlockSparseTopology, bufs: &TopologyBuffers, h: &Handles, transpose: bool, strategy: BlockSparseStrategy) -> Ran {
        let problem = BlockSparseProblem::for_topology(topo, D, transpose);
        let out = nan_buffer::<S>(client, E * FFN * D);
        let ran = launch_dstd_with::<R, S>(client, &problem, topo, bufs, h.s.clone(), h.dout.clone(), out.clone(), strategy)?;
        Ok((ran, read::<S>(client, out, E * FFN * D)))
    }

    // Runs the f32 kernel, then every bf16 strategy (a refused one must be an unsupported
    // tensor-core choice), each on the sample and the bf16 ones in full against the f32 output.
    // `default`: what `Auto` runs where the tensor cores can; `extra` checks one output further.
    let check = |what: &str,
                 run_f32: &dyn Fn() -> Ran,
                 run_bf16: &dyn Fn(BlockSparseStrategy) -> Ran,
                 default: BlockSparseStrategy,
                 positions: &[usize],
                 want: &[f32],
                 extra: &dyn Fn(&str, &[f32])| {
        let sampled = |got: &[f32]| positions.iter().map(|&p| got[p]).collect::<Vec<f32>>();
        let (ran, got_f32) = run_f32().unwrap_or_else(|e| panic!("{what} f32: {e}"));
        assert_eq!(ran, BlockSparseStrategy::Naive, "{what} f32: Auto ran {ran:?}");
        let label = format!("{what} f32 Auto (ran {ran:?})");
        assert_finite(&label, &got_f32);
        report(&format!("{label} sampled vs f64 reference"), rel_l2(&sampled(&got_f32), want), F32_BOUND);
        extra(&label, &got_f32);
        for strategy in BF16_BLOCK_SPARSE_STRATEGIES {
            let label = format!("{what} bf16 {strategy:?}");
            if matches!(strategy, BlockSparseStrategy::CmmaPipelined { .. }) && !cmma {
                let res = run_bf16(strategy);
                assert!(
                    matches!(res, Err(BlockSparseError::Kernel(KernelError::Unsupported(_)))),
                    "{label}: unsupported on this device but not refused: {:?}",
                    res.map(|r| r.0)
                );
                println!("{label}: UNSUPPORTED on this device (refused: {})", res.err().map(|e| e.to_string()).unwrap_or_default());
                continue;
            }
            let (ran, got) = run_bf16(strategy).unwrap_or_else(|e| panic!("{label}: {e}"));
            let expected = match strategy {
                BlockSparseStrategy::Auto if cmma => default,
                BlockSparseStrategy::Auto => BlockSparseStrategy::Naive,
                other => other,
            };
            assert_eq!(ran, expected, "{label}: ran {ran:?}");
            let path = if matches!(ran, BlockSparseStrategy::CmmaPipelined { .. }) { "tensor cores" } else { "one element per unit" };
            let label = format!("{label} (ran {ran:?}, {path})");
            assert_finite(&label, &got);
            report(&format!("{label} sampled vs f64 reference"), rel_l2(&sampled(&got), want), BF16_BOUND);
            report(&format!("{label} full output vs f32 kernel"), rel_l2(&got, &got_f32), BF16_BOUND);
            extra(&label, &got);
        }
    };

    for transpose in [true, false] {
        // SDD: transpose → w [E, F, d] (forward up-projection); else w [E, d, F].
        let what = format!("block-sparse SDD [{rows}x{D}] -> [{}x{BLOCK}x{BLOCK}] transpose={transpose}", topo.nnz());
        let positions: Vec<usize> = prow.iter().flat_map(|&r| sdd_row_positions(&topo, r)).collect();
        let want: Vec<f32> = par_map(prow.len(), |i| sdd_row(&topo, &x, &w, D, prow[i], transpose)).concat();
        check(
            &what,
            &|| sdd::<f32>(&client, &topo, &bufs, &hf, transpose, BlockSparseStrategy::Auto),
            &|st| sdd::<bf16>(&client, &topo, &bufs, &hb, transpose, st),
            BLOCK_SPARSE_CMMA_DEFAULT,
            &positions,
            &want,
            &|_, _| {},
        );

        // DSD: transpose → w [E, d, F] (forward down-projection); else w [E, F, d].
        let what = format!("block-sparse DSD [{}x{BLOCK}x{BLOCK}] -> [{rows}x{D}] transpose={transpose}", topo.nnz());
        let positions: Vec<usize> = prow.iter().flat_map(|&r| (r * D..(r + 1) * D).collect::<Vec<_>>()).collect();
        let want: Vec<f32> = par_map(prow.len(), |i| dsd_row(&topo, &s, &w, D, prow[i], transpose)).concat();
        check(
            &what,
            &|| dsd::<f32>(&client, &topo, &bufs, &hf, transpose, BlockSparseStrategy::Auto),
            &|st| dsd::<bf16>(&client, &topo, &bufs, &hb, transpose, st),
            BLOCK_SPARSE_CMMA_DEFAULT,
            &positions,
            &want,
            &|_, _| {},
        );

        // DSᵀD: weight gradients [E, F, d] or (transpose) [E, d, F].
        let what = format!("block-sparse DSᵀD -> [{E}x{}] transpose={transpose}", if transpose { format!("{D}x{FFN}") } else { format!("{FFN}x{D}") });
        let positions: Vec<usize> = pairs.iter().flat_map(|&(e, c)| dstd_row_positions(FFN, D, e, c, transpose)).collect();
        let want: Vec<f32> = par_map(pairs.len(), |i| dstd_row(&topo, &s, &dout, D, pairs[i].0, pairs[i].1)).concat();
        let starved_zero = |label: &str, got: &[f32]| {
            let zero = (0..FFN).all(|c| dstd_row_positions(FFN, D, STARVED, c, transpose).into_iter().all(|p| got[p] == 0.0));
            assert!(zero, "{label}: expert {STARVED} has no rows but a nonzero gradient");
        };
        check(
            &what,
            &|| dstd::<f32>(&client, &topo, &bufs, &hf, transpose, BlockSparseStrategy::Auto),
            &|st| dstd::<bf16>(&client, &topo, &bufs, &hb, transpose, st),
            BLOCK_SPARSE_CMMA_WEIGHT_GRAD_DEFAULT,
            &positions,
            &want,
            &starved_zero,
        );
    }
}

/// Host only (runs without a GPU): the routing has the promised shape, and the sampled f64 helpers
/// above agree with the crate's full references on small problems.
#[test]
fn host_sampled_helpers_match_the_crate_references() {
    let plan = mixtral_plan();
    println!("routing counts {:?}, {} sampled rows", plan.counts, sample_rows(&plan.offsets).len());
    assert_eq!(plan.counts[STARVED], 0, "expert {STARVED} must be starved");
    assert!((0..E).filter(|&e| e != STARVED).all(|e| plan.counts[e] > 0), "{:?}", plan.counts);
    assert!(plan.counts.iter().any(|c| c % 128 != 0), "some segment must end in a ragged tile: {:?}", plan.counts);
    let (lo, hi) = (plan.counts.iter().filter(|&&c| c > 0).min().unwrap(), plan.counts.iter().max().unwrap());
    assert!(hi >= &(2 * lo), "routing should be uneven: {:?}", plan.counts);
    let rows = sample_rows(&plan.offsets);
    assert!(rows.len() >= 40 && rows.len() <= 48, "{} sampled rows", rows.len());
    for w in plan.offsets.windows(2).filter(|w| w[1] > w[0]) {
        assert!(rows.contains(&w[0]) && rows.contains(&(w[1] - 1)));
    }

    // Small grouped matmul / weight grad with the helpers' formulas (m, k free here).
    let offsets = [0, 5, 5, 12];
    let (m, k) = (7, 9);
    let x = common::values(12 * k, 1);
    let w = common::values(3 * m * k, 2);
    let all: Vec<usize> = (0..12).collect();
    for transpose in [true, false] {
        let want = scatter_ref::grouped_matmul(&x, &w, &offsets, m, k, transpose);
        assert_eq!(grouped_matmul_rows(&x, &w, &offsets, &all, m, k, transpose), want, "transpose={transpose}");
        assert_eq!(grouped_matmul_rows(&x, &w, &offsets, &[4, 11], m, k, transpose), gather_rows(&want, &[4, 11], m));
    }
    let dy = common::values(12 * m, 3);
    let want = scatter_ref::grouped_matmul_weight_grad(&dy, &x, &offsets, m, k);
    let pairs = sample_weight_rows(3, m);
    let got = weight_grad_rows(&dy, &x, &offsets, &pairs, m, k);
    let want_rows: Vec<f32> = pairs.iter().flat_map(|&(e, j)| want[(e * m + j) * k..(e * m + j + 1) * k].iter().copied()).collect();
    let err = rel_l2(&got, &want_rows);
    assert!(err < 1e-6, "weight grad rows {err}");

    // Block-sparse helpers against the full crate references on a small topology: an empty expert,
    // a ragged count, F = 20 padded to 24 (padded columns), block 8.
    let (counts, f, bs, d) = ([3usize, 0, 9, 2], 20, 8, 6);
    let topo = BlockSparseTopology::for_experts(&counts, f, bs).unwrap();
    let x = common::values(topo.rows() * d, 61);
    let w = common::values(counts.len() * f * d, 62);
    let s = common::values(topo.sparse_len(), 63);
    let dout = common::values(topo.rows() * d, 64);
    for transpose in [true, false] {
        let want = bs_ref::sdd(&topo, &x, &w, d, transpose);
        let want_dsd = bs_ref::dsd(&topo, &s, &w, d, transpose);
        for r in 0..topo.rows() {
            let reference: Vec<f32> = sdd_row_positions(&topo, r).into_iter().map(|p| want[p]).collect();
            assert_eq!(sdd_row(&topo, &x, &w, d, r, transpose), reference, "sdd row {r} transpose={transpose}");
            let err = rel_l2(&dsd_row(&topo, &s, &w, d, r, transpose), &want_dsd[r * d..(r + 1) * d]);
            assert!(err < 1e-6, "dsd row {r} transpose={transpose}: {err}");
        }
        let want = bs_ref::dstd(&topo, &s, &dout, d, transpose);
        for e in 0..counts.len() {
            for c in 0..f {
                let reference: Vec<f32> = dstd_row_positions(f, d, e, c, transpose).into_iter().map(|p| want[p]).collect();
                let err = rel_l2(&dstd_row(&topo, &s, &dout, d, e, c), &reference);
                assert!(err < 1e-6, "dstd row ({e}, {c}) transpose={transpose}: {err}");
            }
        }
    }
}
