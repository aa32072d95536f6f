//! Launching the Hopper grouped GEMMs ([`super::wgmma_source`]) through CubeCL's CUDA runtime.
//!
//! CubeCL compiles and caches a kernel from whatever a [`CubeTask`] returns; [`WgmmaTask`] returns
//! our generated CUDA source in place of a `#[cube]` kernel's. The runtime still needs its own
//! description of the kernel's shared memory (it sizes the launch's dynamic shared memory from it):
//! that comes from compiling a two-line `#[cube]` kernel declaring the same number of bytes
//! ([`smem_carrier`]) and keeping its description with our source. Operand tiles arrive by TMA, so
//! the launch binds two tensor maps (built by the runtime from the handles, as for CubeCL's own TMA
//! kernels), the offsets, the tile table and the output, and passes the scalars as the by-value
//! `__grid_constant__` block CubeCL gives every kernel on sm_70+.

use std::any::Any;

use cubecl::cuda::{CudaCompiler, CudaRuntime};
use cubecl::ir::features::Tma;
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;
use cubecl::server::{Handle, KernelArguments, MetadataBindingInfo, TensorMapBinding, TensorMapMeta};
use cubecl::zspace::metadata::Metadata;
use cubecl::{CompilationError, Compiler, CubeTask};

use super::launch::{GroupedMatmulProblem, KernelError, storage_type};
use super::wgmma_source::{WGMMA_BLOCK_K, WGMMA_BLOCK_M, WGMMA_ENTRY, WGMMA_THREADS, WgmmaConfig, wgmma_source};

/// Output columns per cube, and at most this many stages in flight (4 × 48 KiB of the H100/H200's
/// 227 KiB; 3 when the staged output tile takes 64 KiB of it). Outputs at most 128 wide
/// (attention's per-head products) take 128-column tiles instead of half-empty ones.
const WGMMA_BN: usize = 256;
const WGMMA_STAGES: usize = 4;
/// Shared memory per block on sm_90.
const HOPPER_SMEM: usize = 227 * 1024;

fn block_n(cols: usize) -> usize {
    if cols <= 128 { 128 } else { WGMMA_BN }
}

/// Whether a product writes its tiles through shared memory and TMA bulk stores
/// (`BURN_MOE_WGMMA_EPILOGUE`: `all`, the default; `wgrad` = the weight gradients only; `direct` = none,
/// every tile stored from registers). Read once. On an H200 (BENCHMARKS.md) the bulk stores took the
/// weight gradients at T=4096 from 555 to 731 TFLOP/s: their reductions are one segment (~T·k/E rows),
/// so their tiles are many and short, and the direct stores' stall was a quarter of their time; the up
/// projection alone went from 660 to 721 TFLOP/s (at one stage fewer) and the layer's forward alone
/// 475 → 523. A 2-layer training step once looked 2–7% slower with `all`, but that step was waiting on
/// the host; once it was not, `all` made it 4% faster (309 → 322 TFLOP/s, same losses).
fn tma_store_for(wgrad: bool) -> bool {
    static MODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let mode = MODE.get_or_init(|| std::env::var("BURN_MOE_WGMMA_EPILOGUE").map(|v| v.trim().to_ascii_lowercase()).unwrap_or_default());
    match mode.as_str() {
        "direct" | "0" | "off" => false,
        "wgrad" => wgrad,
        _ => true,
    }
}

/// The configuration a launch runs: the most stages (up to [`WGMMA_STAGES`]) that fit.
fn config(bn: usize, wgrad: bool, b_mn: bool, bf16: bool) -> WgmmaConfig {
    let tma_store = tma_store_for(wgrad);
    let mut cfg = WgmmaConfig { bn, stages: WGMMA_STAGES, wgrad, b_mn, bf16, tma_store };
    while cfg.stages > 2 && cfg.shared_bytes() > HOPPER_SMEM {
        cfg.stages -= 1;
    }
    cfg
}

/// The CUDA client behind a generic one, when the runtime is CUDA.
fn cuda_client<R: Runtime>(client: &ComputeClient<R>) -> Option<&ComputeClient<CudaRuntime>> {
    (client as &dyn Any).downcast_ref::<ComputeClient<CudaRuntime>>()
}

/// Whether the Hopper kernels can run for `F` on this client: CUDA, a Hopper GPU (TMA without
/// Blackwell's additions — `wgmma` exists on sm_90 only), f16/bf16, enough shared memory, and the
/// 16-byte row strides TMA needs (`k`, and `m` for the MN-major operands, multiples of 8). For the
/// forward product with `w` stored `[E, k, m]` also `k` a multiple of 64: a 64-deep step past `k`
/// would read the next expert's rows of `w` (against zero-filled `x`, but 0 · NaN is NaN).
pub fn wgmma_supported<R: Runtime, F: Float + CubeElement>(client: &ComputeClient<R>, problem: &GroupedMatmulProblem, wgrad: bool) -> bool {
    let Some(cuda) = cuda_client(client) else { return false };
    let ty = storage_type::<F>();
    let half = ty == StorageType::Scalar(ElemType::Float(FloatKind::F16)) || ty == StorageType::Scalar(ElemType::Float(FloatKind::BF16));
    let props = cuda.properties();
    let hopper = props.features.tma.contains(Tma::Base) && !props.features.tma.contains(Tma::Im2colWide);
    let cfg = config(WGMMA_BN, wgrad, !problem.transpose, true);
    let smem = props.hardware.max_shared_memory_size >= cfg.shared_bytes();
    let strides = problem.k.is_multiple_of(8) && problem.m.is_multiple_of(8);
    let depth = wgrad || problem.transpose || problem.k.is_multiple_of(WGMMA_BLOCK_K);
    half && hopper && smem && strides && depth
}

/// Both tasks index with 32-bit addresses (the generated source computes its own 64-bit offsets).
fn u32_addresses() -> StorageType {
    u32::as_type_native_unchecked().storage_type()
}

/// The generated kernel as a CubeCL task.
struct WgmmaTask {
    cfg: WgmmaConfig,
}

impl KernelMetadata for WgmmaTask {
    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(self.cfg).cube_dim(CubeDim::new_1d(WGMMA_THREADS))
    }

    fn address_type(&self) -> StorageType {
        u32_addresses()
    }
}

impl CubeTask<CudaCompiler> for WgmmaTask {
    fn compile(
        &self,
        compiler: &mut CudaCompiler,
        options: &<CudaCompiler as Compiler>::CompilationOptions,
        mode: ExecutionMode,
        address_type: StorageType,
    ) -> Result<CompiledKernel<CudaCompiler>, CompilationError> {
        let carrier = SmemCarrier { words: self.cfg.shared_bytes().div_ceil(4) };
        let mut compiled = KernelTask::<CudaCompiler, SmemCarrier>::new(carrier).compile(compiler, options, mode, address_type)?;
        let declared = compiled.repr.as_ref().map(|r| r.shared_memory_size()).unwrap_or(0);
        if declared < self.cfg.shared_bytes() {
            return Err(CompilationError::Generic {
                reason: format!("wgmma grouped GEMM: shared-memory carrier declared {declared} bytes, need {}", self.cfg.shared_bytes()),
                backtrace: Default::default(),
            });
        }
        compiled.source = wgmma_source(self.cfg);
        compiled.entrypoint_name = WGMMA_ENTRY.to_string();
        compiled.debug_name = Some("burn_moe::wgmma_grouped_gemm");
        compiled.cube_dim = CubeDim::new_1d(WGMMA_THREADS);
        Ok(compiled)
    }
}

/// A kernel that only declares `words` 32-bit words of shared memory; compiled, never launched.
struct SmemCarrier {
    words: usize,
}

impl KernelMetadata for SmemCarrier {
    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info(self.words).cube_dim(CubeDim::new_1d(WGMMA_THREADS))
    }

    fn address_type(&self) -> StorageType {
        u32_addresses()
    }
}

impl CubeKernel for SmemCarrier {
    fn define(&self) -> KernelDefinition {
        let mut builder = KernelBuilder::new();
        // What a `#[cube(launch)]` kernel's definition does first: the target's properties and the
        // index type (`usize` → u32) must be known to the scope before anything is expanded.
        builder.runtime_properties(CudaRuntime::target_properties());
        AddressType::U32.register(&mut builder.scope);
        let out = builder.output_array(u32::as_type_native_unchecked());
        smem_carrier::expand(&mut builder.scope, out.into(), self.words);
        builder.build(KernelSettings::default().cube_dim(CubeDim::new_1d(WGMMA_THREADS)).kernel_name("burn_moe_smem_carrier"))
    }
}

/// Uses all `words` of a shared array, so the compiler's liveness pass keeps it whole.
#[cube]
fn smem_carrier(out: &mut Array<u32>, #[comptime] words: usize) {
    let mut s = SharedMemory::<u32>::new(words);
    s[words - 1] = UNIT_POS;
    s[0] = UNIT_POS;
    sync_cube();
    out[UNIT_POS as usize] = s[0] + s[words - 1];
}

/// The TMA map of a row-major 16-bit tensor of `shape` with `tile`-sized boxes, the 128-byte swizzle,
/// and zero fill outside the tensor: the operands as `[rows, cols]`, the output of the bulk stores as
/// `[planes, rows, cols]` with boxes of one plane (a weight gradient's tile past its expert's rows, or
/// columns past the last, are then not written).
fn tensor_map<F: CubeElement + CubePrimitive, const D: usize>(handle: &Handle, shape: [usize; D], tile: [usize; D]) -> TensorMapBinding {
    TensorMapBinding {
        binding: handle.clone().binding(),
        map: TensorMapMeta {
            format: TensorMapFormat::Tiled(TiledArgs { tile_size: tile.into() }),
            metadata: Metadata::new(shape, row_major_strides(shape)),
            elem_stride: [1usize; D].into(),
            interleave: TensorMapInterleave::None,
            swizzle: TensorMapSwizzle::B128,
            prefetch: TensorMapPrefetch::None,
            oob_fill: OobFill::Zero,
            storage_ty: storage_type::<F>(),
        },
    }
}

/// Element strides of a contiguous row-major tensor of `shape`.
fn row_major_strides<const D: usize>(shape: [usize; D]) -> [usize; D] {
    let mut strides = [1usize; D];
    for i in (0..D.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

fn check_aligned(what: &str, handle: &Handle) -> Result<(), KernelError> {
    match handle.offset_start.unwrap_or(0) % 16 {
        0 => Ok(()),
        off => Err(KernelError::Unsupported(format!("wgmma grouped GEMM: {what} starts {off} bytes past a 16-byte boundary (TMA needs 16)"))),
    }
}

fn is_bf16<F: CubePrimitive>() -> bool {
    storage_type::<F>() == StorageType::Scalar(ElemType::Float(FloatKind::BF16))
}

/// `out = x · w[e]ᵀ` / `x · w[e]` per segment on the Hopper kernel. `tiles` is the `[expert, first
/// row]` table of 128-row tiles ([`GroupedMatmulProblem::row_tiles`]). The caller checked
/// [`wgmma_supported`] and the offsets.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_wgmma_matmul<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    p: &GroupedMatmulProblem,
    tiles: &[u32],
    x: Handle,
    w: Handle,
    offsets: Handle,
    out: Handle,
    group: usize,
) -> Result<(), KernelError> {
    let cuda = cuda_client(client).ok_or_else(|| KernelError::Unsupported("wgmma grouped GEMM needs the CUDA runtime".into()))?;
    for (what, h) in [("x", &x), ("w", &w), ("out", &out)] {
        check_aligned(what, h)?;
    }
    let row_tiles = tiles.len() / 2;
    if row_tiles == 0 || p.m == 0 {
        return Ok(());
    }
    let cfg = config(block_n(p.m), false, !p.transpose, is_bf16::<F>());
    let map_a = tensor_map::<F, 2>(&x, [p.rows, p.k], [WGMMA_BLOCK_M, WGMMA_BLOCK_K]);
    let map_b = if p.transpose {
        tensor_map::<F, 2>(&w, [p.num_experts * p.m, p.k], [cfg.bn, WGMMA_BLOCK_K])
    } else {
        tensor_map::<F, 2>(&w, [p.num_experts * p.k, p.m], [WGMMA_BLOCK_K, 64])
    };
    let col_tiles = p.m.div_ceil(cfg.bn);
    let tiles_h = cuda.create_from_slice(u32::as_bytes(tiles));
    let grid = TileGrid { x: row_tiles, y: col_tiles, z: 1, group: group.clamp(1, row_tiles) };
    let mut maps = vec![map_a, map_b];
    if cfg.tma_store {
        maps.push(tensor_map::<F, 3>(&out, [1, p.rows, p.m], [1, 64, 64]));
    }
    launch(cuda, cfg, grid, maps, [offsets, tiles_h, out], [p.m as u64, p.k as u64, 0])
}

/// `dw[e] = dy[seg e]ᵀ · x[seg e]` into `dw: [E, m, k]` (every element written; an expert without
/// rows gets zeros) on the Hopper kernel. The caller checked [`wgmma_supported`] and the offsets.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_wgmma_weight_grad<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    p: &GroupedMatmulProblem,
    dy: Handle,
    x: Handle,
    offsets: Handle,
    dw: Handle,
    group: usize,
) -> Result<(), KernelError> {
    let cuda = cuda_client(client).ok_or_else(|| KernelError::Unsupported("wgmma weight gradient needs the CUDA runtime".into()))?;
    for (what, h) in [("dy", &dy), ("x", &x), ("dw", &dw)] {
        check_aligned(what, h)?;
    }
    if p.m == 0 || p.k == 0 || p.num_experts == 0 {
        return Ok(());
    }
    let cfg = config(block_n(p.k), true, true, is_bf16::<F>());
    // Zero-row tensors still need a valid map: TMA rejects a zero extent (every box is then past the
    // end and zero-filled, and no expert has rows to read anyway).
    let rows = p.rows.max(1);
    let map_a = tensor_map::<F, 2>(&dy, [rows, p.m], [WGMMA_BLOCK_K, 64]);
    let map_b = tensor_map::<F, 2>(&x, [rows, p.k], [WGMMA_BLOCK_K, 64]);
    let m_tiles = p.m.div_ceil(WGMMA_BLOCK_M);
    let grid = TileGrid { x: m_tiles, y: p.k.div_ceil(cfg.bn), z: p.num_experts, group: group.clamp(1, m_tiles) };
    let placeholder = offsets.clone();
    let mut maps = vec![map_a, map_b];
    if cfg.tma_store {
        maps.push(tensor_map::<F, 3>(&dw, [p.num_experts, p.m, p.k], [1, 64, 64]));
    }
    launch(cuda, cfg, grid, maps, [offsets, placeholder, dw], [p.k as u64, 0, p.m as u64])
}

/// The output tiles of one launch: `x` (row tiles) by `y` (column tiles) by `z` (experts of a weight
/// gradient), walked in groups of `group` row tiles.
struct TileGrid {
    x: usize,
    y: usize,
    z: usize,
    group: usize,
}

/// Whether the kernel runs persistent (a cube per SM walking the tiles; default) or a cube per tile
/// (`BURN_MOE_WGMMA_PERSISTENT=0`, for comparison). Read once.
fn persistent() -> bool {
    static PERSISTENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PERSISTENT.get_or_init(|| !std::env::var("BURN_MOE_WGMMA_PERSISTENT").is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false")))
}

/// `maps`: the operands' and, with `cfg.tma_store`, the output's. `scalars`: output columns, forward
/// reduction width, weight-gradient output rows.
fn launch(client: &ComputeClient<CudaRuntime>, cfg: WgmmaConfig, grid: TileGrid, maps: Vec<TensorMapBinding>, buffers: [Handle; 3], scalars: [u64; 3]) -> Result<(), KernelError> {
    let total = grid.x * grid.y * grid.z;
    let too_big = || KernelError::Shape(format!("wgmma grouped GEMM: {} x {} x {} output tiles exceed u32", grid.x, grid.y, grid.z));
    let total32 = u32::try_from(total).map_err(|_| too_big())?;
    let sms = client.properties().hardware.num_streaming_multiprocessors.unwrap_or(132).max(1);
    let cubes = if persistent() { total32.min(sms) } else { total32 };
    if cubes > client.properties().hardware.max_cube_count.0 {
        return Err(too_big());
    }
    let [n, k, m] = scalars;
    let mut info = vec![n, k, grid.group as u64, m, grid.x as u64, grid.y as u64, total as u64];
    info.resize(8, 0);
    let len = info.len();
    let args = KernelArguments {
        buffers: buffers.into_iter().map(Handle::binding).collect(),
        // No dynamic part: the whole block is the by-value parameter the kernel declares last.
        info: MetadataBindingInfo::new(info, len),
        tensor_maps: maps,
    };
    client.launch(Box::new(WgmmaTask { cfg }), CubeCount::Static(cubes, 1, 1), args);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_strides_of_the_maps() {
        assert_eq!(row_major_strides([5, 7]), [7, 1]);
        assert_eq!(row_major_strides([3, 5, 7]), [35, 7, 1]);
    }

    /// The task compiles without a GPU (CubeCL's CUDA compiler is plain Rust; NVRTC runs later, in
    /// the runtime): our source and entry point, and a shared-memory description as large as the
    /// kernel's ring, which is what the runtime sizes the launch by.
    #[test]
    fn task_carries_our_source_and_its_shared_memory() {
        for cfg in [
            WgmmaConfig { bn: 256, stages: 4, wgrad: false, b_mn: false, bf16: true, tma_store: false },
            WgmmaConfig { bn: 128, stages: 4, wgrad: true, b_mn: true, bf16: false, tma_store: true },
            config(256, true, true, true),
        ] {
            let compiled = WgmmaTask { cfg }
                .compile(&mut Default::default(), &Default::default(), ExecutionMode::Checked, u32_addresses())
                .unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
            assert_eq!(compiled.entrypoint_name, WGMMA_ENTRY);
            assert_eq!(compiled.source, wgmma_source(cfg));
            assert_eq!(compiled.cube_dim, CubeDim::new_1d(WGMMA_THREADS));
            let smem = compiled.repr.expect("a description for the runtime").shared_memory_size();
            assert!(smem >= cfg.shared_bytes() && smem < cfg.shared_bytes() + 64, "{cfg:?}: {smem} bytes declared");
        }
    }
}
