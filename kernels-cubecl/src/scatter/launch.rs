//! Launch functions: validate a data-free problem description, pick the grid, launch.
//!
//! Buffers are raw CubeCL handles holding contiguous row-major data of the element type `F` (indices
//! and offsets are `u32`). Callers (the Burn backend) choose `F` from each tensor's runtime dtype.

use cubecl::prelude::*;
use cubecl::server::Handle;

use cubecl::ir::{BarrierLevel, ElemType, FloatKind, OpaqueType, StorageType};
use cubecl::ir::features::MmaConfig;

use super::gemm::{
    CMMA_BLOCK_M, CMMA_BLOCK_N, CMMA_PLANE, CMMA_UNITS, TILED_BLOCK_M, TILED_BLOCK_N, TILED_UNITS,
    grouped_matmul_cmma_kernel, grouped_matmul_tiled_kernel,
};
use super::gemm_pipelined::{grouped_matmul_cmma_pipelined_kernel, grouped_matmul_weight_grad_cmma_pipelined_kernel, plane_layout};
use super::gemm_wgrad::{grouped_matmul_weight_grad_cmma_kernel, grouped_matmul_weight_grad_tiled_kernel};
use super::kernel::{combine_backward_kernel, combine_kernel, grouped_matmul_kernel, grouped_matmul_weight_grad_kernel, permute_kernel};

/// Threads per cube for the element-wise style kernels.
const CUBE_THREADS: u32 = 256;

/// A launch that cannot run as described.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// The element type is not one the kernels are compiled for.
    #[error("unsupported element type {0} (supported: f32, f16, bf16)")]
    UnsupportedDtype(String),
    /// Sizes that do not fit together.
    #[error("{0}")]
    Shape(String),
    /// A kernel variant that this runtime or element type cannot run.
    #[error("{0}")]
    Unsupported(String),
}

/// Which kernel computes a grouped matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupedMatmulStrategy {
    /// [`Cmma`](Self::Cmma) where [`cmma_supported`] holds, else [`Tiled`](Self::Tiled).
    Auto,
    /// One unit per output element, no tiling (the small-problem baseline).
    Naive,
    /// Shared-memory tiles of 64 × 64 outputs, f32 accumulation, any float type.
    Tiled,
    /// Tensor-core fragments (16 × 16 × 16) on 128 × 128 tiles: f16/bf16 operands, f32 accumulation.
    Cmma,
    /// [`Cmma`](Self::Cmma) with asynchronous global → shared copies `stages` steps of `block_k`
    /// ahead of the tensor cores (see [`cmma_pipelined_supported`] for where it runs).
    CmmaPipelined {
        /// Reduction depth per step: 32 or 64.
        block_k: usize,
        /// Steps in flight: 2 to 4.
        stages: usize,
        /// Four planes of 64 × 64 outputs per cube (128 units) instead of eight of 64 × 32 (256
        /// units): twice the tensor-core products per shared-memory fragment load.
        wide: bool,
        /// The tensor-core work by hand: `ldmatrix` fragment loads and `mma.sync` m16n8k16 with the
        /// accumulators in registers, instead of CubeCL's wmma-class `cmma` fragments (see
        /// [`cmma_pipelined_manual_supported`] for where it runs; elsewhere `Auto` runs the same
        /// configuration without it).
        manual: bool,
    },
    /// Hopper (sm_90) only: warpgroup `wgmma` products on operand tiles brought by the bulk tensor
    /// copy engine (TMA), 128 × 256 outputs per cube, 4 stages, one producer and two consumer
    /// warpgroups. Written as generated CUDA source compiled and launched by CubeCL's CUDA runtime,
    /// because CubeCL 0.10's kernel language cannot emit `wgmma` (see `wgmma_source.rs`). f16/bf16;
    /// see [`wgmma_supported`] for where it runs. `Auto` picks it there while [`wgmma_enabled`].
    Wgmma,
}

/// The pipelined tensor-core configuration [`GroupedMatmulStrategy::Auto`] picks for the grouped
/// matmul where it can run: the fastest on an H200 at Mixtral shapes (`moe_bench --gemm`,
/// 2026-11-29, T=16384: wide 64 × 2 with manual MMA 336 TFLOP/s up projection and 355 down, against
/// 251 / 233 for the same tiles through CubeCL's `cmma` fragments and 100–105 for the single-stage
/// kernel). Where manual MMA is not available (anything but CUDA sm_80+) `Auto` runs the same tiles
/// through `cmma`.
pub const CMMA_PIPELINED_DEFAULT: GroupedMatmulStrategy = GroupedMatmulStrategy::CmmaPipelined { block_k: 64, stages: 2, wide: true, manual: true };

/// The same for the weight gradient, whose best configuration differs (same measurement: wide
/// 32 × 4 with manual MMA 368 TFLOP/s, 64 × 2 358; through `cmma` 235 / 221).
pub const CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT: GroupedMatmulStrategy =
    GroupedMatmulStrategy::CmmaPipelined { block_k: 32, stages: 4, wide: true, manual: true };

/// What `Auto` resolves to where the pipelined kernels run: `(grouped matmul, weight gradient)`.
/// `None` = the compiled-in defaults above.
static PIPELINED_CHOICE: std::sync::RwLock<Option<(GroupedMatmulStrategy, GroupedMatmulStrategy)>> = std::sync::RwLock::new(None);

/// Replaces the pipelined configurations that [`GroupedMatmulStrategy::Auto`] picks, for the whole
/// process (`None` restores [`CMMA_PIPELINED_DEFAULT`] / [`CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT`]).
/// A `manual` configuration (as the defaults are) is what `Auto` runs where
/// [`cmma_pipelined_manual_supported`] holds; elsewhere `Auto` runs the same configuration on the
/// wmma path.
///
/// Why a process-wide setting: the layer above (burn-moe-backend) launches through `Auto`, and the
/// best configuration depends on the card and the shapes; this lets a benchmark or a user tune it
/// without rebuilding, as cuBLAS picks its own algorithm.
///
/// # Errors
/// [`KernelError::Unsupported`] when either strategy is not a valid `CmmaPipelined` configuration.
pub fn set_pipelined_defaults(choice: Option<(GroupedMatmulStrategy, GroupedMatmulStrategy)>) -> Result<(), KernelError> {
    if let Some((forward, weight_grad)) = choice {
        for s in [forward, weight_grad] {
            let GroupedMatmulStrategy::CmmaPipelined { block_k, stages, .. } = s else {
                return Err(KernelError::Unsupported(format!("pipelined default: {s:?} is not a CmmaPipelined configuration")));
            };
            check_pipeline(block_k, stages)?;
        }
    }
    *PIPELINED_CHOICE.write().unwrap_or_else(|e| e.into_inner()) = choice;
    Ok(())
}

/// 0: not decided yet (read `BURN_MOE_WGMMA` on first use), 1: on, 2: off.
static WGMMA_ENABLED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether [`GroupedMatmulStrategy::Auto`] runs the Hopper kernel ([`GroupedMatmulStrategy::Wgmma`])
/// where [`wgmma_supported`] holds, for the whole process. Off, `Auto` runs the pipelined CubeCL
/// kernels ([`pipelined_defaults`]) as on other GPUs: the portable path, for comparison.
pub fn set_wgmma_enabled(enabled: bool) {
    WGMMA_ENABLED.store(if enabled { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_wgmma_enabled`]; until it is called, on unless the environment has `BURN_MOE_WGMMA=0`
/// (or `off`/`false`), which is how a run of the trainer is switched to the portable kernels.
pub fn wgmma_enabled() -> bool {
    match WGMMA_ENABLED.load(std::sync::atomic::Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("BURN_MOE_WGMMA").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "0" | "off" | "false" | "no"));
            set_wgmma_enabled(!off);
            !off
        }
    }
}

/// Whether [`GroupedMatmulStrategy::Wgmma`] can run `problem` (the forward product, or with
/// `weight_grad` its weight gradient) for `F` on this client: the CUDA runtime on a Hopper GPU,
/// f16/bf16, the 16-byte row strides TMA needs (`k` and `m` multiples of 8), and for the forward
/// product with `w` stored `[E, k, m]` also `k` a multiple of 64.
pub fn wgmma_supported<R: Runtime, F: Float + CubeElement>(client: &ComputeClient<R>, problem: &GroupedMatmulProblem, weight_grad: bool) -> bool {
    #[cfg(feature = "cuda")]
    {
        super::wgmma::wgmma_supported::<R, F>(client, problem, weight_grad)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (client, problem, weight_grad);
        false
    }
}

/// Row tiles per group in the order the pipelined kernels walk their output tiles (see
/// `grouped_tile` in `gemm_pipelined.rs`): the default of [`set_tile_group`]. Measured on an H200
/// (2026-11-29, BENCHMARKS.md): the Mixtral layer's forward+backward at T=16384 takes 155.1 ms with
/// groups of 16 against 165.9 in launch order; the GEMMs alone move by about 1% (8, 16 and 32 alike).
pub const TILE_GROUP_DEFAULT: usize = 16;

static TILE_GROUP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(TILE_GROUP_DEFAULT);

/// Sets, for the whole process, how many row tiles the pipelined grouped matmul and weight-gradient
/// kernels group together when ordering their output tiles (`0`: plain launch order, row tiles
/// fastest). Larger groups keep more of the row operand in L2 per column tile; the best value is a
/// property of the card (a benchmark knob, as [`set_pipelined_defaults`]).
pub fn set_tile_group(group: usize) {
    TILE_GROUP.store(group, std::sync::atomic::Ordering::Relaxed);
}

/// The current [`set_tile_group`] value.
pub fn tile_group() -> usize {
    TILE_GROUP.load(std::sync::atomic::Ordering::Relaxed)
}

/// The group size passed to a kernel whose grid has `row_tiles` x tiles: within `1..=row_tiles`
/// (`row_tiles` is the launch order).
fn tile_group_for(row_tiles: usize) -> usize {
    let rows = row_tiles.max(1);
    match tile_group() {
        0 => rows,
        g => g.min(rows),
    }
}

/// The pipelined configurations `Auto` picks now: `(grouped matmul, weight gradient)`.
pub fn pipelined_defaults() -> (GroupedMatmulStrategy, GroupedMatmulStrategy) {
    PIPELINED_CHOICE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or((CMMA_PIPELINED_DEFAULT, CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT))
}

impl std::fmt::Display for GroupedMatmulStrategy {
    /// The name [`FromStr`](std::str::FromStr) reads back (`auto`, `tiled`, `64x2w`, ...).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Naive => f.write_str("naive"),
            Self::Tiled => f.write_str("tiled"),
            Self::Cmma => f.write_str("cmma"),
            Self::Wgmma => f.write_str("wgmma"),
            Self::CmmaPipelined { block_k, stages, wide, manual } => {
                write!(f, "{block_k}x{stages}{}{}", if *wide { "w" } else { "" }, if *manual { "m" } else { "" })
            }
        }
    }
}

impl std::str::FromStr for GroupedMatmulStrategy {
    type Err = KernelError;

    /// `auto`, `naive`, `tiled`, `cmma`, or a pipelined configuration `<block_k>x<stages>` with a
    /// trailing `w` for the wide plane layout and then `m` for manual MMA (e.g. `64x2`, `32x4w`,
    /// `64x2wm`, `32x4m`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            KernelError::Unsupported(format!(
                "grouped matmul strategy `{s}`: expected auto, naive, tiled, cmma, wgmma or <block_k>x<stages>[w][m] (e.g. 64x2, 32x4w, 64x2wm)"
            ))
        };
        Ok(match s.trim() {
            "auto" => Self::Auto,
            "naive" => Self::Naive,
            "tiled" => Self::Tiled,
            "cmma" => Self::Cmma,
            "wgmma" => Self::Wgmma,
            other => {
                let (other, manual) = match other.strip_suffix('m') {
                    Some(b) => (b, true),
                    None => (other, false),
                };
                let (body, wide) = match other.strip_suffix('w') {
                    Some(b) => (b, true),
                    None => (other, false),
                };
                let (bk, st) = body.split_once('x').ok_or_else(bad)?;
                let block_k = bk.parse().map_err(|_| bad())?;
                let stages = st.parse().map_err(|_| bad())?;
                check_pipeline(block_k, stages)?;
                Self::CmmaPipelined { block_k, stages, wide, manual }
            }
        })
    }
}

/// A grouped matmul over expert segments, without data.
///
/// `rows` sorted rows of width `k` are multiplied segment by segment with `num_experts` matrices:
/// `y = x · w[e]ᵀ` with `w: [E, m, k]` (`transpose`), or `y = x · w[e]` with `w: [E, k, m]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedMatmulProblem {
    /// Rows of `x` and `y` (`offsets[E]`).
    pub rows: usize,
    /// Output width.
    pub m: usize,
    /// Inner (reduction) width.
    pub k: usize,
    /// Number of segments / matrices.
    pub num_experts: usize,
    /// Whether each `w[e]` is stored `[m, k]` (and used transposed).
    pub transpose: bool,
}

impl GroupedMatmulProblem {
    /// Checks the sizes against host offsets (`E + 1` entries, non-decreasing, ending at `rows`).
    ///
    /// # Errors
    /// [`KernelError::Shape`] naming the mismatch.
    pub fn validate(&self, offsets: &[usize]) -> Result<(), KernelError> {
        if offsets.len() != self.num_experts + 1 {
            return Err(KernelError::Shape(format!(
                "offsets has {} entries, expected num_experts + 1 = {}",
                offsets.len(),
                self.num_experts + 1
            )));
        }
        if offsets.windows(2).any(|w| w[0] > w[1]) || offsets[0] != 0 || offsets[self.num_experts] != self.rows {
            return Err(KernelError::Shape(format!(
                "offsets {offsets:?} must rise from 0 to rows = {}",
                self.rows
            )));
        }
        Ok(())
    }
}

impl GroupedMatmulProblem {
    /// The row tiles of height `block_m` over all expert segments, as `[expert, first row]` pairs
    /// (experts without rows get none). `offsets` must have passed [`validate`](Self::validate).
    ///
    /// # Errors
    /// [`KernelError::Shape`] when a row or expert index does not fit in `u32`.
    pub fn row_tiles(&self, offsets: &[usize], block_m: usize) -> Result<Vec<u32>, KernelError> {
        let to_u32 = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| KernelError::Shape(format!("{what} {v} does not fit in u32 (grouped matmul tile table)")))
        };
        let mut tiles = Vec::new();
        for (e, seg) in offsets.windows(2).enumerate() {
            let mut row = seg[0];
            while row < seg[1] {
                tiles.push(to_u32(e, "expert")?);
                tiles.push(to_u32(row, "row")?);
                row += block_m;
            }
        }
        Ok(tiles)
    }
}

/// The storage type of `F` as CubeCL's IR names it.
pub(crate) fn storage_type<F: CubePrimitive>() -> StorageType {
    F::as_type_native_unchecked().storage_type()
}

/// Whether [`GroupedMatmulStrategy::Cmma`] can run for element type `F` on this client: `F` is f16 or
/// bf16, the runtime reports 16 × 16 × 16 cooperative-matrix support for (`F`, `F`, f32), and planes
/// are exactly 32 units wide (the kernel's plane layout).
pub fn cmma_supported<R: Runtime, F: Float + CubeElement>(client: &ComputeClient<R>) -> bool {
    let ty = storage_type::<F>();
    let half = [ElemType::Float(FloatKind::F16).into(), ElemType::Float(FloatKind::BF16).into()];
    if !half.contains(&ty) {
        return false;
    }
    let props = client.properties();
    let config = MmaConfig { a_type: ty, b_type: ty, cd_type: ElemType::Float(FloatKind::F32).into(), m: 16, n: 16, k: 16 };
    props.features.matmul.cmma.contains(&config)
        && props.hardware.plane_size_min == CMMA_PLANE
        && props.hardware.plane_size_max == CMMA_PLANE
}

/// Whether [`GroupedMatmulStrategy::CmmaPipelined`] can run `problem` for element type `F` here: what
/// [`cmma_supported`] asks, plus cube-level barriers with asynchronous copies (CUDA), and 16-byte
/// operand vectors (`k`, and `m` where `w` is `[E, k, m]`, multiples of 8 elements).
pub fn cmma_pipelined_supported<R: Runtime, F: Float + CubeElement>(client: &ComputeClient<R>, problem: &GroupedMatmulProblem) -> bool {
    cmma_supported::<R, F>(client)
        && client.properties().features.supports_type(OpaqueType::Barrier(BarrierLevel::Cube))
        && cmma_vector_size::<R, F>(client, problem) == 8
}

/// Whether [`GroupedMatmulStrategy::CmmaPipelined`] with `manual` can run `problem` for element
/// type `F` here: what [`cmma_pipelined_supported`] asks, plus the runtime's manual MMA for
/// m16n8k16 (`F`, `F` → f32, `mma.sync`) and `ldmatrix` for `F`; CubeCL 0.10 offers both only on CUDA
/// (sm_80+), whose register layouts the kernel assumes.
pub fn cmma_pipelined_manual_supported<R: Runtime, F: Float + CubeElement>(client: &ComputeClient<R>, problem: &GroupedMatmulProblem) -> bool {
    let ty = storage_type::<F>();
    let matmul = &client.properties().features.matmul;
    let config = MmaConfig { a_type: ty, b_type: ty, cd_type: ElemType::Float(FloatKind::F32).into(), m: 16, n: 8, k: 16 };
    cmma_pipelined_supported::<R, F>(client, problem) && matmul.mma.contains(&config) && matmul.ldmatrix.contains(&ty)
}

/// Checks a pipelined configuration's numbers.
pub(crate) fn check_pipeline(block_k: usize, stages: usize) -> Result<(), KernelError> {
    if !(block_k == 32 || block_k == 64) || !(2..=4).contains(&stages) {
        return Err(KernelError::Unsupported(format!(
            "pipelined tensor-core grouped GEMM: block_k {block_k} (32 or 64) and stages {stages} (2 to 4) are not a supported configuration"
        )));
    }
    Ok(())
}

/// The widest vector (elements) the tensor-core kernel can read `x` and `w` with: it must divide `k`
/// (and `m` when `w` is `[E, k, m]`) and fit in 16 bytes and the device's vector limit.
fn cmma_vector_size<R: Runtime, F: CubeElement>(client: &ComputeClient<R>, p: &GroupedMatmulProblem) -> usize {
    let max = client.properties().hardware.max_vector_size.min(16 / std::mem::size_of::<F>().max(1));
    [8usize, 4, 2, 1]
        .into_iter()
        .find(|&n| n <= max && p.k.is_multiple_of(n) && (p.transpose || p.m.is_multiple_of(n)))
        .unwrap_or(1)
}

fn cube_dim() -> CubeDim {
    CubeDim::new_1d(CUBE_THREADS)
}


/// `out[i] = x[rows[i]]` for `n` rows of width `cols`.
pub fn launch_permute<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    x: Handle,
    x_rows: usize,
    rows: Handle,
    n: usize,
    cols: usize,
    out: Handle,
) {
    if n * cols == 0 {
        return;
    }
    let v = crate::reduce::row_vector_size::<R, F>(client, cols, &[&x, &out]);
    let count = cubecl::calculate_cube_count_elemwise(client, n * cols / v, cube_dim());
    // SAFETY: the kernel returns past the last output vector; the caller's `rows` are in
    // `0..x_rows`, so every read is inside `x`.
    unsafe {
        permute_kernel::launch_unchecked::<F, I, R>(
            client,
            count,
            cube_dim(),
            v,
            ArrayArg::from_raw_parts(x, x_rows * cols),
            ArrayArg::from_raw_parts(rows, n),
            ArrayArg::from_raw_parts(out, n * cols),
            cols / v,
        );
    }
}

/// Grouped matmul with [`GroupedMatmulStrategy::Auto`]; `offsets` is a device buffer of `E + 1`
/// `u32` matching `host_offsets`.
///
/// # Errors
/// [`KernelError::Shape`] when the problem and offsets disagree or the grid would be too large.
#[allow(clippy::too_many_arguments)]
pub fn launch_grouped_matmul<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &GroupedMatmulProblem,
    host_offsets: &[usize],
    x: Handle,
    w: Handle,
    offsets: Handle,
    out: Handle,
) -> Result<(), KernelError> {
    launch_grouped_matmul_with::<R, F>(client, problem, host_offsets, x, w, offsets, out, GroupedMatmulStrategy::Auto)
        .map(|_| ())
}

/// What `strategy` means on this device: `Auto` is the Hopper kernel where [`wgmma_supported`] (and
/// [`wgmma_enabled`]), else the `pipelined` tensor-core configuration where
/// [`cmma_pipelined_supported`] (a `manual` one only where [`cmma_pipelined_manual_supported`], else
/// its wmma twin), else the single-stage tensor-core kernel where [`cmma_supported`], else the tiled
/// one; asking for a tensor-core kernel where it cannot run is an error naming the product.
fn resolve_strategy<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &GroupedMatmulProblem,
    strategy: GroupedMatmulStrategy,
    pipelined: GroupedMatmulStrategy,
    weight_grad: bool,
) -> Result<GroupedMatmulStrategy, KernelError> {
    let what = if weight_grad { "weight gradient" } else { "matmul" };
    match strategy {
        // Not for thin products (LoRA's rank-r factors): a 128 × 128+ tile 64 deep would be mostly
        // padding there; the CubeCL kernels' smaller steps waste less.
        GroupedMatmulStrategy::Auto if wgmma_enabled() && problem.m >= 64 && problem.k >= 64 && wgmma_supported::<R, F>(client, problem, weight_grad) => {
            Ok(GroupedMatmulStrategy::Wgmma)
        }
        GroupedMatmulStrategy::Wgmma if !wgmma_supported::<R, F>(client, problem, weight_grad) => Err(KernelError::Unsupported(format!(
            "wgmma grouped {what} needs the CUDA runtime on a Hopper GPU (sm_90), f16/bf16 ({:?} here), k and m multiples of 8 (k {}, m {}){}",
            storage_type::<F>(),
            problem.k,
            problem.m,
            if weight_grad || problem.transpose { String::new() } else { format!(", and k a multiple of 64 for w stored [E, k, m] (k {})", problem.k) }
        ))),
        GroupedMatmulStrategy::Auto if cmma_pipelined_supported::<R, F>(client, problem) => match pipelined {
            // Manual MMA (the default) only where it runs; elsewhere the same tiles through `cmma`.
            GroupedMatmulStrategy::CmmaPipelined { block_k, stages, wide, manual: true } if !cmma_pipelined_manual_supported::<R, F>(client, problem) => {
                Ok(GroupedMatmulStrategy::CmmaPipelined { block_k, stages, wide, manual: false })
            }
            other => Ok(other),
        },
        GroupedMatmulStrategy::Auto if cmma_supported::<R, F>(client) => Ok(GroupedMatmulStrategy::Cmma),
        GroupedMatmulStrategy::CmmaPipelined { block_k, stages, manual, .. } => {
            check_pipeline(block_k, stages)?;
            if !cmma_pipelined_supported::<R, F>(client, problem) {
                Err(KernelError::Unsupported(format!(
                    "pipelined tensor-core grouped {what} needs f16/bf16 cmma, cube barriers with async copies, and k{} a multiple of 8 on this device",
                    if problem.transpose { "" } else { " and m" }
                )))
            } else if manual && !cmma_pipelined_manual_supported::<R, F>(client, problem) {
                Err(KernelError::Unsupported(format!(
                    "pipelined tensor-core grouped {what} with manual MMA needs mma.sync m16n8k16 and ldmatrix for {:?} (CUDA sm_80+) on this device",
                    storage_type::<F>()
                )))
            } else {
                Ok(strategy)
            }
        }
        GroupedMatmulStrategy::Auto => Ok(GroupedMatmulStrategy::Tiled),
        GroupedMatmulStrategy::Cmma if !cmma_supported::<R, F>(client) => Err(KernelError::Unsupported(format!(
            "tensor-core grouped {what} needs f16/bf16 operands with 16x16x16 cmma ({:?} x {:?} -> f32) and 32-wide planes on this device",
            storage_type::<F>(),
            storage_type::<F>()
        ))),
        other => Ok(other),
    }
}

/// Grouped matmul with an explicit kernel choice; returns the kernel that ran (what `Auto` resolved
/// to). Every output row of every segment is written.
///
/// # Errors
/// [`KernelError::Shape`] when the problem and offsets disagree or the grid would exceed the
/// device's cube count; [`KernelError::Unsupported`] for `Cmma` where [`cmma_supported`] is false.
#[allow(clippy::too_many_arguments)]
pub fn launch_grouped_matmul_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &GroupedMatmulProblem,
    host_offsets: &[usize],
    x: Handle,
    w: Handle,
    offsets: Handle,
    out: Handle,
    strategy: GroupedMatmulStrategy,
) -> Result<GroupedMatmulStrategy, KernelError> {
    problem.validate(host_offsets)?;
    let p = problem;
    let strategy = resolve_strategy::<R, F>(client, p, strategy, pipelined_defaults().0, false)?;
    let total = p.rows * p.m;
    if total == 0 {
        return Ok(strategy);
    }
    let x_arg = |n: usize| unsafe { ArrayArg::from_raw_parts(x.clone(), p.rows * p.k / n) };
    let w_arg = |n: usize| unsafe { ArrayArg::from_raw_parts(w.clone(), p.num_experts * p.m * p.k / n) };
    let off_arg = || unsafe { ArrayArg::from_raw_parts(offsets.clone(), p.num_experts + 1) };
    let out_arg = || unsafe { ArrayArg::from_raw_parts(out.clone(), total) };
    match strategy {
        GroupedMatmulStrategy::Wgmma => {
            #[cfg(feature = "cuda")]
            {
                let tiles = p.row_tiles(host_offsets, super::wgmma_source::WGMMA_BLOCK_M)?;
                super::wgmma::launch_wgmma_matmul::<R, F>(client, p, &tiles, x, w, offsets, out, tile_group())?;
            }
            #[cfg(not(feature = "cuda"))]
            unreachable!("resolve_strategy refuses wgmma without the cuda feature");
        }
        GroupedMatmulStrategy::Naive => {
            let count = cubecl::calculate_cube_count_elemwise(client, total, cube_dim());
            grouped_matmul_kernel::launch::<F, R>(
                client, count, cube_dim(), x_arg(1), w_arg(1), off_arg(), out_arg(), p.m, p.k, p.num_experts, p.transpose,
            );
        }
        GroupedMatmulStrategy::Tiled | GroupedMatmulStrategy::Cmma | GroupedMatmulStrategy::CmmaPipelined { .. } => {
            let cmma = strategy != GroupedMatmulStrategy::Tiled;
            let (bm, bn) = if cmma { (CMMA_BLOCK_M, CMMA_BLOCK_N) } else { (TILED_BLOCK_M, TILED_BLOCK_N) };
            let tiles = p.row_tiles(host_offsets, bm)?;
            let count = grid(client, tiles.len() / 2, p.m.div_ceil(bn))?;
            let tiles_len = tiles.len();
            let tiles = client.create_from_slice(u32::as_bytes(&tiles));
            let tiles_arg = unsafe { ArrayArg::from_raw_parts(tiles, tiles_len) };
            if let GroupedMatmulStrategy::CmmaPipelined { block_k, stages, wide, manual } = strategy {
                let group = tile_group_for(tiles_len / 2);
                // SAFETY: as for the single-stage kernel below; the copies are bounds-checked too
                // (out-of-range vectors are copied with source length zero, i.e. zero-filled).
                unsafe {
                    grouped_matmul_cmma_pipelined_kernel::launch_unchecked::<F, R>(
                        client,
                        count,
                        plane_layout(wide).cube_dim(),
                        8,
                        x_arg(8),
                        w_arg(8),
                        off_arg(),
                        tiles_arg,
                        out_arg(),
                        p.m,
                        p.k,
                        group,
                        p.transpose,
                        block_k,
                        stages,
                        wide,
                        manual,
                    );
                }
            } else if cmma {
                let n = cmma_vector_size::<R, F>(client, p);
                // SAFETY: every global and shared-memory access of the kernel is bounds-checked in
                // the kernel against `rows`/`m`/`k` and the segment ends; the buffer lengths passed
                // here are the ones the problem was validated for.
                unsafe {
                    grouped_matmul_cmma_kernel::launch_unchecked::<F, R>(
                        client, count, CubeDim::new_1d(CMMA_UNITS), n, x_arg(n), w_arg(n), off_arg(), tiles_arg, out_arg(), p.m,
                        p.k, p.transpose,
                    );
                }
            } else {
                // SAFETY: as above, the kernel bounds-checks every access itself.
                unsafe {
                    grouped_matmul_tiled_kernel::launch_unchecked::<F, R>(
                        client, count, CubeDim::new_1d(TILED_UNITS), x_arg(1), w_arg(1), off_arg(), tiles_arg, out_arg(), p.m,
                        p.k, p.transpose,
                    );
                }
            }
        }
        GroupedMatmulStrategy::Auto => unreachable!("resolved above"),
    }
    Ok(strategy)
}

/// The `(row tiles, column tiles)` grid, checked against the device's cube-count limits.
fn grid<R: Runtime>(client: &ComputeClient<R>, row_tiles: usize, col_tiles: usize) -> Result<CubeCount, KernelError> {
    let (max_x, max_y, _) = client.properties().hardware.max_cube_count;
    match (u32::try_from(row_tiles), u32::try_from(col_tiles)) {
        (Ok(x), Ok(y)) if x <= max_x && y <= max_y => Ok(CubeCount::Static(x, y, 1)),
        _ => Err(KernelError::Shape(format!(
            "grouped matmul grid of {row_tiles} row tiles x {col_tiles} column tiles exceeds the device limit {max_x} x {max_y}"
        ))),
    }
}

/// Weight gradient `dw[e] = dy[seg e]ᵀ · x[seg e]` into `dw: [E, m, k]` (every element written) with
/// [`GroupedMatmulStrategy::Auto`] (tensor cores where supported, else the shared-memory tiled kernel).
///
/// # Errors
/// [`KernelError::Shape`] when the problem and offsets disagree.
#[allow(clippy::too_many_arguments)]
pub fn launch_grouped_matmul_weight_grad<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &GroupedMatmulProblem,
    host_offsets: &[usize],
    dy: Handle,
    x: Handle,
    offsets: Handle,
    dw: Handle,
) -> Result<(), KernelError> {
    launch_grouped_matmul_weight_grad_with::<R, F>(client, problem, host_offsets, dy, x, offsets, dw, GroupedMatmulStrategy::Auto)
        .map(|_| ())
}

/// Weight gradient with an explicit kernel choice; returns the kernel that ran. `Auto` resolves to
/// [`CMMA_PIPELINED_WEIGHT_GRAD_DEFAULT`] (or what [`set_pipelined_defaults`] chose) where [`cmma_pipelined_supported`], else `Cmma` where
/// [`cmma_supported`], else `Tiled` (each checked against the f32 tiled kernel and timed on an H200
/// by `moe_bench --gemm`).
///
/// # Errors
/// [`KernelError::Shape`] when the problem and offsets disagree or the grid would exceed the
/// device's cube count; [`KernelError::Unsupported`] for `Cmma` where [`cmma_supported`] is false.
#[allow(clippy::too_many_arguments)]
pub fn launch_grouped_matmul_weight_grad_with<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    problem: &GroupedMatmulProblem,
    host_offsets: &[usize],
    dy: Handle,
    x: Handle,
    offsets: Handle,
    dw: Handle,
    strategy: GroupedMatmulStrategy,
) -> Result<GroupedMatmulStrategy, KernelError> {
    problem.validate(host_offsets)?;
    let p = problem;
    // The weight gradient reads dy ([rows, m]) and x ([rows, k]) row-major: both widths must suit
    // the vectors, as for the forward kernel with `w: [E, k, m]`.
    let row_major = GroupedMatmulProblem { transpose: false, ..*p };
    let strategy = resolve_strategy::<R, F>(client, &row_major, strategy, pipelined_defaults().1, true)?;
    let total = p.num_experts * p.m * p.k;
    if total == 0 {
        return Ok(strategy);
    }
    let dy_arg = |n: usize| unsafe { ArrayArg::from_raw_parts(dy.clone(), (p.rows * p.m).max(n) / n) };
    let x_arg = |n: usize| unsafe { ArrayArg::from_raw_parts(x.clone(), (p.rows * p.k).max(n) / n) };
    let off_arg = || unsafe { ArrayArg::from_raw_parts(offsets.clone(), p.num_experts + 1) };
    let dw_arg = || unsafe { ArrayArg::from_raw_parts(dw.clone(), total) };
    let experts = u32::try_from(p.num_experts)
        .ok()
        .filter(|&e| e <= client.properties().hardware.max_cube_count.2)
        .ok_or_else(|| KernelError::Shape(format!("{} experts exceed the device's z cube count", p.num_experts)))?;
    match strategy {
        GroupedMatmulStrategy::Wgmma => {
            #[cfg(feature = "cuda")]
            super::wgmma::launch_wgmma_weight_grad::<R, F>(client, p, dy, x, offsets, dw, tile_group())?;
            #[cfg(not(feature = "cuda"))]
            unreachable!("resolve_strategy refuses wgmma without the cuda feature");
        }
        GroupedMatmulStrategy::Naive => {
            let count = cubecl::calculate_cube_count_elemwise(client, total, cube_dim());
            grouped_matmul_weight_grad_kernel::launch::<F, R>(client, count, cube_dim(), dy_arg(1), x_arg(1), off_arg(), dw_arg(), p.m, p.k);
        }
        GroupedMatmulStrategy::Tiled => {
            let CubeCount::Static(tm, tk, _) = grid(client, p.m.div_ceil(TILED_BLOCK_M), p.k.div_ceil(TILED_BLOCK_N))? else {
                unreachable!("grid is static")
            };
            // SAFETY: the kernel bounds-checks every access against rows/m/k and the segment ends.
            unsafe {
                grouped_matmul_weight_grad_tiled_kernel::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static(tm, tk, experts),
                    CubeDim::new_1d(TILED_UNITS),
                    dy_arg(1),
                    x_arg(1),
                    off_arg(),
                    dw_arg(),
                    p.m,
                    p.k,
                );
            }
        }
        GroupedMatmulStrategy::CmmaPipelined { block_k, stages, wide, manual } => {
            let CubeCount::Static(tm, tk, _) = grid(client, p.m.div_ceil(CMMA_BLOCK_M), p.k.div_ceil(CMMA_BLOCK_N))? else {
                unreachable!("grid is static")
            };
            // SAFETY: every access is bounds-checked in the kernel (zero-length copies past the ends).
            unsafe {
                grouped_matmul_weight_grad_cmma_pipelined_kernel::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static(tm, tk, experts),
                    plane_layout(wide).cube_dim(),
                    8,
                    dy_arg(8),
                    x_arg(8),
                    off_arg(),
                    dw_arg(),
                    p.m,
                    p.k,
                    tile_group_for(tm as usize),
                    block_k,
                    stages,
                    wide,
                    manual,
                );
            }
        }
        GroupedMatmulStrategy::Cmma => {
            let CubeCount::Static(tm, tk, _) = grid(client, p.m.div_ceil(CMMA_BLOCK_M), p.k.div_ceil(CMMA_BLOCK_N))? else {
                unreachable!("grid is static")
            };
            let n = cmma_vector_size::<R, F>(client, &row_major);
            // SAFETY: as above.
            unsafe {
                grouped_matmul_weight_grad_cmma_kernel::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static(tm, tk, experts),
                    CubeDim::new_1d(CMMA_UNITS),
                    n,
                    dy_arg(n),
                    x_arg(n),
                    off_arg(),
                    dw_arg(),
                    p.m,
                    p.k,
                );
            }
        }
        GroupedMatmulStrategy::Auto => unreachable!("resolved above"),
    }
    Ok(strategy)
}

/// `out[t] = Σ_j weights[t, j] · y[slots[t·k + j]]` for `tokens` rows of width `cols`.
#[allow(clippy::too_many_arguments)]
pub fn launch_combine<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    y: Handle,
    y_rows: usize,
    slots: Handle,
    weights: Handle,
    tokens: usize,
    top_k: usize,
    cols: usize,
    out: Handle,
) {
    let total = tokens * cols;
    if total == 0 {
        return;
    }
    let v = crate::reduce::row_vector_size::<R, F>(client, cols, &[&y, &out]);
    let count = cubecl::calculate_cube_count_elemwise(client, total / v, cube_dim());
    // SAFETY: the kernel returns past the last output vector; the caller's slots are in `0..y_rows`.
    unsafe {
        combine_kernel::launch_unchecked::<F, I, R>(
            client,
            count,
            cube_dim(),
            v,
            ArrayArg::from_raw_parts(y, y_rows * cols),
            ArrayArg::from_raw_parts(slots, tokens * top_k),
            ArrayArg::from_raw_parts(weights, tokens * top_k),
            ArrayArg::from_raw_parts(out, total),
            cols / v,
            top_k,
        );
    }
}

/// Both gradients of [`launch_combine`] for the output gradient `dout` (`[tokens, cols]`), when
/// `slots` names each of the `y_rows = tokens · top_k` rows of `y` exactly once:
/// `dy[slots[t·k + j]] = weights[t, j] · dout[t]` (`[y_rows, cols]`) and
/// `dweights[t, j] = dout[t] · y[slots[t·k + j]]` (`[tokens, top_k]`). A cube per token.
///
/// # Errors
/// [`KernelError::Shape`] when `y_rows` is not `tokens · top_k` (the slots cannot then be a
/// permutation of `y`'s rows, and rows would be written twice or not at all).
#[allow(clippy::too_many_arguments)]
pub fn launch_combine_backward<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    dout: Handle,
    y: Handle,
    y_rows: usize,
    slots: Handle,
    weights: Handle,
    tokens: usize,
    top_k: usize,
    cols: usize,
    dy: Handle,
    dweights: Handle,
) -> Result<(), KernelError> {
    if y_rows != tokens * top_k {
        return Err(KernelError::Shape(format!(
            "combine backward: y has {y_rows} rows but {tokens} tokens x top-k {top_k} = {} slots; it needs each row named once",
            tokens * top_k
        )));
    }
    if tokens == 0 || top_k == 0 {
        return Ok(());
    }
    let n = crate::reduce::row_vector_size::<R, F>(client, cols, &[&dout, &y, &dy]);
    let vectors = cols / n;
    // SAFETY: every cube returns past the last token; a token's units index its own `dout` row and
    // the `y` / `dy` rows its slots name (in `0..y_rows` by the caller's permutation), at vector
    // positions below `vectors`.
    unsafe {
        combine_backward_kernel::launch_unchecked::<F, I, R>(
            client,
            crate::reduce::row_grid(tokens),
            CubeDim::new_1d(crate::reduce::REDUCE_UNITS),
            n,
            ArrayArg::from_raw_parts(dout, tokens * cols),
            ArrayArg::from_raw_parts(y, y_rows * cols),
            ArrayArg::from_raw_parts(slots, tokens * top_k),
            ArrayArg::from_raw_parts(weights, tokens * top_k),
            ArrayArg::from_raw_parts(dy, y_rows * cols),
            ArrayArg::from_raw_parts(dweights, tokens * top_k),
            tokens,
            vectors,
            top_k,
        );
    }
    Ok(())
}
