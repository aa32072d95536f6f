//! The `#[cube]` routing kernels. All of them run cube-wide scans in shared memory instead of
//! atomics, so the results are deterministic and the expert order is stable by construction.
//!
//! Expert indices are read in the backend's integer type `I` (u32, i32 or i64) and compared in that
//! type, so a negative or too-large index is never truncated into a valid one. Every output is `u32`.

use cubecl::prelude::*;

/// Units per cube of every routing kernel (a power of two: the scan doubles its stride up to it).
pub const ROUTING_UNITS: u32 = 256;
/// Consecutive flat pairs each unit of [`stable_scatter_kernel`] owns in one chunk.
pub const ROUTING_ITEMS: usize = 4;
/// Flat pairs one cube of [`stable_scatter_kernel`] ranks per step (`ROUTING_UNITS · ROUTING_ITEMS`).
pub const ROUTING_CHUNK: usize = ROUTING_UNITS as usize * ROUTING_ITEMS;

/// Inclusive scan of `value` over the units of the cube (Hillis–Steele in `shared`, which must hold
/// [`ROUTING_UNITS`] entries). Returns this unit's inclusive prefix; on return `shared[UNITS − 1]`
/// holds the cube total until the caller's next `sync_cube` and write.
#[cube]
fn cube_inclusive_scan(shared: &mut SharedMemory<u32>, value: u32) -> u32 {
    let u = UNIT_POS as usize;
    shared[u] = value;
    sync_cube();
    let mut stride = 1usize;
    while stride < ROUTING_UNITS as usize {
        let mut add = 0u32;
        if u >= stride {
            add = shared[u - stride];
        }
        // Every unit reads before any unit writes: the scan is in place.
        sync_cube();
        shared[u] += add;
        sync_cube();
        stride *= 2;
    }
    shared[u]
}

/// Cube `e < num_experts` writes `counts[e]` = number of `indices[i] == e`; cube `num_experts`
/// writes `invalid[0]` = number of indices outside `[0, num_experts)`. Launched with
/// `num_experts + 1` cubes of [`ROUTING_UNITS`] units; each cube reads all `len` indices once
/// (coalesced, unit-strided).
#[cube(launch_unchecked)]
pub fn expert_histogram_kernel<I: Int>(
    indices: &Array<I>,
    counts: &mut Array<u32>,
    invalid: &mut Array<u32>,
    len: usize,
    num_experts: usize,
) {
    let cube = CUBE_POS_X as usize;
    let expert = I::cast_from(cube);
    let zero = I::cast_from(0u32);
    let limit = I::cast_from(num_experts);
    let mut n = 0u32;
    let mut i = UNIT_POS as usize;
    while i < len {
        let v = indices[i];
        if cube < num_experts {
            if v == expert {
                n += 1;
            }
        } else if v < zero || v >= limit {
            n += 1;
        }
        i += ROUTING_UNITS as usize;
    }
    let mut shared = SharedMemory::<u32>::new(ROUTING_UNITS as usize);
    cube_inclusive_scan(&mut shared, n);
    if UNIT_POS == 0 {
        let total = shared[ROUTING_UNITS as usize - 1];
        if cube < num_experts {
            counts[cube] = total;
        } else {
            invalid[0] = total;
        }
    }
}

/// `offsets[0] = 0`, `offsets[e + 1] = Σ_{j ≤ e} ⌈counts[j] / block⌉ · block`: the exclusive prefix sum
/// of the counts rounded up to `block` (`block = 1` gives the plain segment offsets). One cube of
/// [`ROUTING_UNITS`] units walks the experts in chunks of that many, carrying the running total.
#[cube(launch_unchecked)]
pub fn padded_offsets_kernel(counts: &Array<u32>, offsets: &mut Array<u32>, num_experts: usize, block: u32) {
    let u = UNIT_POS as usize;
    if u == 0 {
        offsets[0] = 0u32;
    }
    let mut shared = SharedMemory::<u32>::new(ROUTING_UNITS as usize);
    let mut carry = 0u32;
    let mut base = 0usize;
    while base < num_experts {
        let e = base + u;
        let mut v = 0u32;
        if e < num_experts {
            // ⌈c / block⌉ · block without forming `c + block − 1`, which could overflow.
            let c = counts[e];
            v = c / block * block;
            if v < c {
                v += block;
            }
        }
        let incl = cube_inclusive_scan(&mut shared, v);
        if e < num_experts {
            offsets[e + 1] = carry + incl;
        }
        carry += shared[ROUTING_UNITS as usize - 1];
        // The next chunk's scan overwrites `shared`: everyone must have read the total first.
        sync_cube();
        base += ROUTING_UNITS as usize;
    }
}

/// Cube `e` places every flat pair `f` with `indices[f] == e` at position `offsets[e] + r`, `r` being
/// the number of earlier pairs of expert `e` (a stable counting sort): `sorted_flat[pos] = f`,
/// `sorted_token[pos] = f / top_k`, `slots[f] = pos`. Launched with `num_experts` cubes of
/// [`ROUTING_UNITS`] units; each walks all `len` indices in chunks of [`ROUTING_CHUNK`], unit `u`
/// owning [`ROUTING_ITEMS`] consecutive pairs, whose match counts a cube scan turns into ranks.
#[cube(launch_unchecked)]
// The nested `if`s stay nested: CubeCL's `&&` evaluates both sides, and `indices[f]` must not be read
// for `f ≥ len` in an unchecked launch.
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
pub fn stable_scatter_kernel<I: Int>(
    indices: &Array<I>,
    offsets: &Array<u32>,
    sorted_flat: &mut Array<u32>,
    sorted_token: &mut Array<u32>,
    slots: &mut Array<u32>,
    len: usize,
    top_k: usize,
) {
    let cube = CUBE_POS_X as usize;
    let expert = I::cast_from(cube);
    let mut shared = SharedMemory::<u32>::new(ROUTING_UNITS as usize);
    let mut next = offsets[cube];
    let mut chunk = 0usize;
    while chunk < len {
        let first = chunk + UNIT_POS as usize * ROUTING_ITEMS;
        let mut mine = 0u32;
        #[unroll]
        for j in 0..ROUTING_ITEMS {
            let f = first + j;
            if f < len {
                if indices[f] == expert {
                    mine += 1;
                }
            }
        }
        // Units own consecutive pairs in unit order, so the exclusive prefix of the match counts is
        // the rank of this unit's first match within the chunk: flat order is kept.
        let incl = cube_inclusive_scan(&mut shared, mine);
        let mut pos = next + incl - mine;
        #[unroll]
        for j in 0..ROUTING_ITEMS {
            let f = first + j;
            if f < len {
                if indices[f] == expert {
                    let p = pos as usize;
                    sorted_flat[p] = u32::cast_from(f);
                    sorted_token[p] = u32::cast_from(f / top_k);
                    slots[f] = pos;
                    pos += 1;
                }
            }
        }
        next += shared[ROUTING_UNITS as usize - 1];
        sync_cube();
        chunk += ROUTING_CHUNK;
    }
}

/// `block_expert[b]` = the expert whose padded segment holds rows `b·block .. (b+1)·block`, for
/// `b < padded_offsets[E] / block`; `num_experts` (a sentinel no expert has) for the remaining
/// `b < capacity`. One unit per block, a binary search over the `E + 1` padded offsets.
#[cube(launch_unchecked)]
pub fn block_expert_kernel(
    padded_offsets: &Array<u32>,
    block_expert: &mut Array<u32>,
    num_experts: usize,
    block: u32,
    capacity: usize,
) {
    let b = ABSOLUTE_POS;
    if b >= capacity {
        terminate!();
    }
    let blocks = (padded_offsets[num_experts] / block) as usize;
    let mut out = u32::cast_from(num_experts);
    if b < blocks {
        let row = u32::cast_from(b) * block;
        // Largest e in [0, E) with padded_offsets[e] ≤ row: empty segments share their start with
        // the next one, so the largest such e is the one whose segment is non-empty and holds `row`.
        let mut lo = 0usize;
        let mut hi = num_experts;
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if padded_offsets[mid] <= row {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        out = u32::cast_from(lo);
    }
    block_expert[b] = out;
}
