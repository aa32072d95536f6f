//! The CUDA C++ source of the Hopper grouped GEMM ([`super::wgmma`]), generated per configuration.
//!
//! Why generated text and not a `#[cube]` kernel: CubeCL 0.10 lowers its matrix API to `wmma` /
//! `mma.sync` (Ampere-class, issued per warp, operands from registers) and has no way to emit
//! Hopper's `wgmma` (issued per warpgroup of 4 warps, both operands read from shared memory by the
//! tensor cores, asynchronous). The products below are written in CUDA with inline PTX and
//! compiled by CubeCL's own CUDA runtime (NVRTC, `sm_90a`), so they run on CubeCL's stream, in
//! order with every other kernel of the step, with no synchronisation of their own.
//!
//! Structure of one cube (CUDA block) of 384 threads, owning a 128 × `bn` output tile:
//! - warpgroup 0 is the producer: one thread issues the bulk tensor copies (TMA) of each 64-deep
//!   step into a ring of `stages` shared-memory stages, completing on that stage's "full"
//!   `mbarrier`; it waits on the stage's "empty" barrier before reusing it;
//! - warpgroups 1 and 2 are consumers, 64 output rows each: per step they wait on "full", issue 4
//!   `wgmma.m64n{bn}k16` (f32 accumulators in registers), keep one step of products in flight, and
//!   release the previous step's stage on "empty".
//!
//! Operand layouts in shared memory are what TMA writes with the 128-byte swizzle: rows of 64
//! elements (128 bytes), 16-byte chunks XOR-permuted within each 8-row (1 KiB) atom. `wgmma` reads
//! them through matrix descriptors: K-major (the reduction dimension contiguous: `x`, and `w` stored
//! `[n, k]`) with the 8-row group stride 1 KiB, advancing 32 bytes per 16-deep slice; MN-major (the
//! output dimension contiguous: `w` stored `[k, n]`, and both operands of the weight gradient)
//! as 64-wide column blocks of 64 rows (8 KiB each, the "leading" stride), 8-row groups 1 KiB apart,
//! advancing 2 KiB (16 rows) per slice.

/// What one compiled variant of the kernel computes (the launcher in [`super::wgmma`] picks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct WgmmaConfig {
    /// Output columns per cube: 128 or 256 (the `n` of `wgmma.m64nNk16`).
    pub bn: usize,
    /// Shared-memory stages in the ring (2 to 4).
    pub stages: usize,
    /// Weight gradient (`dw[e] = dy[seg e]ᵀ · x[seg e]`) instead of the grouped forward product.
    pub wgrad: bool,
    /// Forward only: `w` stored `[E, k, n]` (MN-major) instead of `[E, n, k]` (K-major).
    pub b_mn: bool,
    /// bf16 operands (else f16).
    pub bf16: bool,
    /// Write output tiles through shared memory and TMA bulk stores (asynchronous: the stores drain
    /// while the next tile's products run) instead of from registers straight to global memory.
    /// Forward products store this way only the tiles that lie wholly inside their segment (a bulk
    /// store cannot stop at a segment's end); the others keep the direct stores.
    pub tma_store: bool,
}

/// Output rows per cube: two consumer warpgroups of 64.
pub(crate) const WGMMA_BLOCK_M: usize = 128;
/// Reduction depth per pipeline step: one 128-byte swizzled row of 16-bit elements.
pub(crate) const WGMMA_BLOCK_K: usize = 64;
/// Threads per cube: one producer and two consumer warpgroups.
pub(crate) const WGMMA_THREADS: u32 = 384;
/// The kernel's entry point.
pub(crate) const WGMMA_ENTRY: &str = "burn_moe_wgmma_grouped_gemm";

impl WgmmaConfig {
    /// Bytes of one stage: the 128-row A tile and the `bn`-row B tile, 64 deep, 2 bytes each.
    pub fn stage_bytes(self) -> usize {
        (WGMMA_BLOCK_M + self.bn) * WGMMA_BLOCK_K * 2
    }

    /// Bytes of the output tile staged for the TMA stores (none without them).
    pub fn epilogue_bytes(self) -> usize {
        if self.tma_store { WGMMA_BLOCK_M * self.bn * 2 } else { 0 }
    }

    /// Dynamic shared memory the kernel asks for: the stages, the staged output tile, two barriers
    /// per stage, and 1 KiB of slack to align the ring to the 1 KiB the 128-byte swizzle needs.
    pub fn shared_bytes(self) -> usize {
        self.stages * self.stage_bytes() + self.epilogue_bytes() + self.stages * 16 + 1024
    }
}

/// The shared-memory matrix descriptor of `wgmma` (PTX ISA, "Matrix Descriptor Format"): start
/// address, leading- and stride-dimension byte offsets (each in 16-byte units, 14 bits), and the
/// 128-byte swizzle mode (1 in bits 62–63). Mirrors the device helper in the generated source; kept
/// here so a CPU test pins the bit layout.
#[cfg(test)]
fn matrix_descriptor(smem_addr: u32, leading_bytes: u32, stride_bytes: u32) -> u64 {
    let enc = |v: u32| u64::from((v & 0x3FFFF) >> 4);
    enc(smem_addr) | (enc(leading_bytes) << 16) | (enc(stride_bytes) << 32) | (1u64 << 62)
}

/// The CUDA source of `cfg`.
pub(crate) fn wgmma_source(cfg: WgmmaConfig) -> String {
    let bn = cfg.bn;
    let acc = bn / 2; // f32 accumulators per thread: 64 × bn over 128 threads
    let ty = if cfg.bf16 { "bf16" } else { "f16" };
    let trans_a = u8::from(cfg.wgrad);
    let trans_b = u8::from(cfg.wgrad || cfg.b_mn);
    let regs = (0..acc).map(|i| format!("%{i}")).collect::<Vec<_>>().join(", ");
    let outs = (0..acc).map(|i| format!("\"+f\"(d[{i}])")).collect::<Vec<_>>().join(", ");
    let wgmma = format!(
        "__device__ __forceinline__ void wgmma_step(float* d, u64 da, u64 db) {{\n\
         asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{sd}, 0;\\n\
         wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.{ty}.{ty} {{{regs}}}, %{a}, %{b}, p, 1, 1, {trans_a}, {trans_b};\\n}}\\n\"\n\
         : {outs}\n : \"l\"(da), \"l\"(db), \"r\"(1));\n}}\n",
        a = acc,
        b = acc + 1,
        sd = acc + 2,
    );
    let cvt = if cfg.bf16 { "cvt.rn.bf16x2.f32" } else { "cvt.rn.f16x2.f32" };
    format!(
        r#"// burn-moe: Hopper grouped GEMM (wgmma + TMA), generated by kernels-cubecl/src/scatter/wgmma_source.rs
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
struct __align__(64) TmaMap {{ u64 v[16]; }};
struct Params {{ u64 v[8]; }};

#define BN {bn}
#define STAGES {stages}
#define WGRAD {wgrad}
#define B_MN {b_mn}
#define TMA_STORE {tma_store}
#define A_BYTES (128 * 64 * 2)
#define B_BYTES (BN * 64 * 2)
#define BOX_BYTES (64 * 64 * 2)

__device__ __forceinline__ u32 smem_u32(const void* p) {{
  u64 a; asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p)); return (u32)a;
}}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {{
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {{
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}}
__device__ __forceinline__ void mbar_arrive(u32 bar) {{
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {{
  asm volatile("{{\n.reg .pred P1;\nWAIT_LOOP:\nmbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n@P1 bra WAIT_DONE;\nbra WAIT_LOOP;\nWAIT_DONE:\n}}\n" :: "r"(bar), "r"(parity) : "memory");
}}
__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaMap* map, int c0, int c1, u32 bar) {{
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {{%2, %3}}], [%4];"
               :: "r"(dst), "l"((u64)map), "r"(c0), "r"(c1), "r"(bar) : "memory");
}}
__device__ __forceinline__ void tma_store_3d(const TmaMap* map, int c0, int c1, int c2, u32 src) {{
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {{%1, %2, %3}}], [%4];"
               :: "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(src) : "memory");
}}
__device__ __forceinline__ void st_shared(u32 addr, u32 v) {{
  asm volatile("st.shared.u32 [%0], %1;" :: "r"(addr), "r"(v) : "memory");
}}
__device__ __forceinline__ u64 desc(u32 addr, u32 lead, u32 stride) {{
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lead & 0x3FFFF) >> 4) << 16) | ((u64)((stride & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}}
__device__ __forceinline__ void wg_fence() {{ asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }}
__device__ __forceinline__ void wg_commit() {{ asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }}
__device__ __forceinline__ void wg_wait0() {{ asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }}
__device__ __forceinline__ void wg_wait1() {{ asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }}
__device__ __forceinline__ void keep(float& r) {{ asm volatile("" : "+f"(r) :: "memory"); }}
__device__ __forceinline__ u32 pack2(float lo, float hi) {{
  u32 r; asm("{cvt} %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}}
{wgmma}
// Tile `t` of a (gx, gy, gz) grid of output tiles, walked in groups of `group` x tiles, column by
// column within a group, so the cubes working at one time share their operand tiles in L2 (the same
// order as the CubeCL kernels); z (the expert of a weight gradient) outermost.
struct Tile {{ u32 x, y, z; }};
__device__ __forceinline__ Tile tile_of(u32 t, u32 gx, u32 gy, u32 group) {{
  const u32 per_z = gx * gy;
  const u32 z = t / per_z;
  const u32 pid = t % per_z;
  const u32 per_group = group * gy;
  const u32 first = (pid / per_group) * group;
  const u32 left = gx - first;
  const u32 size = left < group ? left : group;
  const u32 r = pid % per_group;
  Tile tile; tile.x = first + r % size; tile.y = r / size; tile.z = z;
  return tile;
}}

// What one output tile reads: its expert, first output row and column, the rows of its reduction
// (weight gradient: the expert's segment), and the number of 64-deep steps.
struct Work {{ u32 e, row0, row_end, n0, seg0, seg_len, nk; }};
__device__ __forceinline__ Work work_of(u32 t, const Params& p, const u32* offsets, const u32* tiles) {{
  const Tile tile = tile_of(t, (u32)p.v[4], (u32)p.v[5], (u32)p.v[2]);
  Work w;
  w.n0 = tile.y * BN;
#if WGRAD
  w.e = tile.z;
  w.seg0 = offsets[w.e];
  w.seg_len = offsets[w.e + 1] - w.seg0;
  w.row0 = tile.x * 128;
  w.row_end = (u32)p.v[3];
  w.nk = (w.seg_len + 63) / 64;
#else
  w.e = tiles[2 * tile.x];
  w.row0 = tiles[2 * tile.x + 1];
  w.row_end = offsets[w.e + 1];
  w.seg0 = 0;
  w.seg_len = 0;
  w.nk = ((u32)p.v[1] + 63) / 64;
#endif
  return w;
}}

// p.v: [0] n (output columns), [1] k (forward reduction width), [2] group, [3] m (weight-gradient
// output rows), [4] x tiles, [5] y tiles, [6] all tiles (x · y · z).
// Each cube walks tiles blockIdx.x, blockIdx.x + gridDim.x, ...: one tile per cube when the grid has
// a cube per tile, or persistent (a cube per SM) so that one tile's epilogue overlaps the loads of
// the next and the pipeline is filled once per cube rather than once per tile. The stage ring and
// its barrier phases run on across tiles (`it` counts 64-deep steps over all of them).
// With TMA_STORE a third map, of the output as [E, m, n] (weight gradient) or [1, rows, n].
extern "C" __global__ void __launch_bounds__({threads}, 1) {entry}(
    const __grid_constant__ TmaMap map_a, const __grid_constant__ TmaMap map_b,
#if TMA_STORE
    const __grid_constant__ TmaMap map_c,
#endif
    const u16* __restrict__ a_buf, const u16* __restrict__ b_buf,
#if TMA_STORE
    const u16* __restrict__ c_buf,
#endif
    const u32* __restrict__ offsets, const u32* __restrict__ tiles, u16* __restrict__ out,
    const __grid_constant__ Params p) {{
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 raw = smem_u32(smem_raw);
  const u32 base = (raw + 1023u) & ~1023u;
  const u32 a_s = base;
  const u32 b_s = base + STAGES * A_BYTES;
  // The staged output tile (TMA_STORE): 64-row x 64-column boxes of 8 KiB, 128-byte swizzled like
  // the operands, warpgroup 1's BN / 64 boxes then warpgroup 2's.
  const u32 c_s = b_s + STAGES * B_BYTES;
  const u32 full = c_s + TMA_STORE * 128 * BN * 2;
  const u32 empty = full + STAGES * 8;
  const u32 n = (u32)p.v[0];
  const u32 total = (u32)p.v[6];

  if (threadIdx.x == 0) {{
    for (int s = 0; s < STAGES; ++s) {{
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, 8);
    }}
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }}
  __syncthreads();

  if (threadIdx.x < 128) {{
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x == 0) {{
      u32 it = 0;
      for (u32 t = blockIdx.x; t < total; t += gridDim.x) {{
        const Work w = work_of(t, p, offsets, tiles);
        for (u32 kt = 0; kt < w.nk; ++kt, ++it) {{
          const u32 s = it % STAGES;
          if (it >= STAGES) mbar_wait(empty + 8 * s, ((it / STAGES) - 1) & 1);
          const u32 bar = full + 8 * s;
          mbar_expect_tx(bar, A_BYTES + B_BYTES);
          const u32 a_dst = a_s + s * A_BYTES;
          const u32 b_dst = b_s + s * B_BYTES;
#if WGRAD
          const int r = (int)(w.seg0 + kt * 64);
          tma_load_2d(a_dst, &map_a, (int)w.row0, r, bar);
          tma_load_2d(a_dst + BOX_BYTES, &map_a, (int)w.row0 + 64, r, bar);
          for (int j = 0; j < BN / 64; ++j) tma_load_2d(b_dst + j * BOX_BYTES, &map_b, (int)w.n0 + 64 * j, r, bar);
#else
          tma_load_2d(a_dst, &map_a, (int)(kt * 64), (int)w.row0, bar);
#if B_MN
          for (int j = 0; j < BN / 64; ++j) tma_load_2d(b_dst + j * BOX_BYTES, &map_b, (int)w.n0 + 64 * j, (int)(w.e * (u32)p.v[1] + kt * 64), bar);
#else
          tma_load_2d(b_dst, &map_b, (int)(kt * 64), (int)(w.e * n + w.n0), bar);
#endif
#endif
        }}
      }}
    }}
    return;
  }}

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const u32 wg = threadIdx.x / 128 - 1;
  const u32 warp = (threadIdx.x % 128) / 32;
  const u32 lane = threadIdx.x % 32;
  float d[{acc}];
  u32 it = 0;
  for (u32 t = blockIdx.x; t < total; t += gridDim.x) {{
    const Work w = work_of(t, p, offsets, tiles);
#pragma unroll
    for (int i = 0; i < {acc}; ++i) d[i] = 0.0f;
    for (u32 kt = 0; kt < w.nk; ++kt, ++it) {{
      const u32 s = it % STAGES;
      mbar_wait(full + 8 * s, (it / STAGES) & 1);
      const u32 a_st = a_s + s * A_BYTES;
      const u32 b_st = b_s + s * B_BYTES;
#if WGRAD
      // The last step of a segment: rows past its end belong to the next expert (or are past the
      // tensor, already zero); zero them in both operands so they add nothing, not even NaN.
      const u32 valid = w.seg_len - kt * 64;
      if (valid < 64) {{
        const u32 rows = 64 - valid;
        const u32 boxes = 2 + BN / 64;
        const u32 count = boxes * rows * 8;
        for (u32 i = threadIdx.x - 128; i < count; i += 256) {{
          const u32 box = i / (rows * 8);
          const u32 rem = i % (rows * 8);
          const u32 row = valid + rem / 8;
          const u32 chunk = rem % 8;
          const u32 box_base = box < 2 ? a_st + box * BOX_BYTES : b_st + (box - 2) * BOX_BYTES;
          const u32 addr = box_base + row * 128 + chunk * 16;
          asm volatile("st.shared.v4.u32 [%0], {{%1, %1, %1, %1}};" :: "r"(addr), "r"(0) : "memory");
        }}
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        asm volatile("bar.sync 1, 256;" ::: "memory");
      }}
#endif
#pragma unroll
      for (int i = 0; i < {acc}; ++i) keep(d[i]);
      wg_fence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {{
#if WGRAD
        const u64 da = desc(a_st + wg * BOX_BYTES + ks * 2048, BOX_BYTES, 1024);
#else
        const u64 da = desc(a_st + wg * BOX_BYTES + ks * 32, 16, 1024);
#endif
#if WGRAD || B_MN
        const u64 db = desc(b_st + ks * 2048, BOX_BYTES, 1024);
#else
        const u64 db = desc(b_st + ks * 32, 16, 1024);
#endif
        wgmma_step(d, da, db);
      }}
      wg_commit();
      wg_wait1();
#pragma unroll
      for (int i = 0; i < {acc}; ++i) keep(d[i]);
      // The previous step's products are done: its stage may be refilled.
      if (kt > 0 && lane == 0) mbar_arrive(empty + 8 * ((it - 1) % STAGES));
    }}
    wg_wait0();
#pragma unroll
    for (int i = 0; i < {acc}; ++i) keep(d[i]);
    // And the tile's last step: every stage used is released once, so the ring's phases stay in
    // step with the producer's across tiles.
    if (w.nk > 0 && lane == 0) mbar_arrive(empty + 8 * ((it - 1) % STAGES));

    // Accumulator layout of wgmma m64nNk16 (f32): warp w of the warpgroup holds rows 16w..16w+15;
    // for each 8-column slice j, d[4j], d[4j+1] are (row lane/4, columns 8j + 2(lane%4) + 0/1) and
    // d[4j+2], d[4j+3] the same columns 8 rows down.
#if TMA_STORE
    // Whole tiles (every weight-gradient tile: the map stops at its expert's m rows; a forward tile
    // inside its segment) go out by bulk stores from shared memory, issued by one thread per
    // warpgroup and left to drain while the next tile runs. Before overwriting its boxes, that
    // thread waits until the previous tile's stores have read them.
#if WGRAD
    const bool bulk = true;
#else
    const bool bulk = w.row0 + 128 <= w.row_end;
#endif
    if (bulk) {{
      const u32 c_wg = c_s + wg * (BN / 64) * BOX_BYTES;
      const bool leader = (threadIdx.x % 128) == 0;
      if (leader) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
      asm volatile("bar.sync %0, 128;" :: "r"(2 + wg) : "memory");
      // Row r of a box holds 16-byte chunk c at chunk c ^ (r % 8); this thread's rows are
      // warp * 16 + lane / 4 and 8 further, both = lane / 4 modulo 8.
      const u32 r_in = warp * 16 + lane / 4;
      const u32 sw = lane / 4;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {{
        const u32 box = c_wg + (j / 8) * BOX_BYTES;
        const u32 at = (((u32)(j % 8) ^ sw) << 4) + (lane % 4) * 4;
        st_shared(box + r_in * 128 + at, pack2(d[4 * j], d[4 * j + 1]));
        st_shared(box + (r_in + 8) * 128 + at, pack2(d[4 * j + 2], d[4 * j + 3]));
      }}
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      asm volatile("bar.sync %0, 128;" :: "r"(2 + wg) : "memory");
      if (leader) {{
#if WGRAD
        const int plane = (int)w.e;
#else
        const int plane = 0;
#endif
#pragma unroll
        for (int j = 0; j < BN / 64; ++j) tma_store_3d(&map_c, (int)(w.n0 + 64 * j), (int)(w.row0 + wg * 64), plane, c_wg + j * BOX_BYTES);
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }}
      continue;
    }}
#endif
    const u32 r_a = w.row0 + wg * 64 + warp * 16 + lane / 4;
    const u32 r_b = r_a + 8;
#if WGRAD
    u16* dst = out + (u64)w.e * w.row_end * n;
#else
    u16* dst = out;
#endif
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {{
      const u32 col = w.n0 + 8 * j + 2 * (lane % 4);
      if (col < n) {{
        if (r_a < w.row_end) *(u32*)(dst + (u64)r_a * n + col) = pack2(d[4 * j], d[4 * j + 1]);
        if (r_b < w.row_end) *(u32*)(dst + (u64)r_b * n + col) = pack2(d[4 * j + 2], d[4 * j + 3]);
      }}
    }}
  }}
#if TMA_STORE
  // Shared memory must outlive the last bulk stores' reads.
  if ((threadIdx.x % 128) == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}}
"#,
        stages = cfg.stages,
        wgrad = u8::from(cfg.wgrad),
        b_mn = u8::from(cfg.b_mn),
        tma_store = u8::from(cfg.tma_store),
        entry = WGMMA_ENTRY,
        threads = WGMMA_THREADS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_bits() {
        // 1 KiB-aligned address 0x400, K-major (leading 16 B, stride 1 KiB), 128-byte swizzle.
        let d = matrix_descriptor(0x400, 16, 1024);
        assert_eq!(d & 0x3FFF, 0x40);
        assert_eq!((d >> 16) & 0x3FFF, 1);
        assert_eq!((d >> 32) & 0x3FFF, 64);
        assert_eq!(d >> 62, 1);
        // MN-major: 8 KiB between 64-wide column blocks.
        assert_eq!((matrix_descriptor(0, 8192, 1024) >> 16) & 0x3FFF, 512);
    }

    #[test]
    fn source_has_one_wgmma_with_all_accumulators() {
        for (bn, wgrad, b_mn, bf16, tma_store, stages) in
            [(256, false, false, true, false, 4), (128, true, true, false, true, 4), (256, false, true, true, false, 4), (256, true, true, true, true, 3)]
        {
            let cfg = WgmmaConfig { bn, stages, wgrad, b_mn, bf16, tma_store };
            let src = wgmma_source(cfg);
            let ty = if bf16 { "bf16" } else { "f16" };
            assert!(src.contains(&format!("m64n{bn}k16.f32.{ty}.{ty}")), "{cfg:?}");
            // Every accumulator register is bound exactly once, and the descriptors follow.
            assert!(src.contains(&format!("\"+f\"(d[{}])", bn / 2 - 1)) && !src.contains(&format!("\"+f\"(d[{}])", bn / 2)));
            let trans = if wgrad { "1, 1;" } else if b_mn { "0, 1;" } else { "0, 0;" };
            assert!(src.contains(&format!("p, 1, 1, {trans}")), "{cfg:?}");
            assert!(cfg.shared_bytes() <= 227 * 1024);
            // The staged output and its third tensor map come together.
            assert_eq!(src.contains("#define TMA_STORE 1"), tma_store, "{cfg:?}");
        }
    }
}
