//! The `#[cube]` kernels of the router gate. Math in f32 whatever the storage type.

use cubecl::prelude::*;

use crate::reduce::{REDUCE_UNITS, cube_reduce_rows};

/// `out[t, e] = Σ_c x[t, c] · gate[e, c]` for token `t = CUBE_POS`: units stride over the row in
/// vectors of `N` (`vectors` per row) keeping one sum per expert, then the cube adds the `experts`
/// sums of all units at once through shared memory.
#[cube(launch_unchecked)]
pub fn gate_logits_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    gate: &Array<Vector<F, N>>,
    out: &mut Array<F>,
    tokens: usize,
    vectors: usize,
    #[comptime] experts: usize,
) {
    let t = CUBE_POS as usize;
    if t >= tokens {
        terminate!();
    }
    let nv = N::value();
    let u = UNIT_POS as usize;
    let units = REDUCE_UNITS as usize;
    let mut acc = Array::<Vector<f32, N>>::new(experts);
    #[unroll]
    for e in 0..experts {
        acc[e] = Vector::<f32, N>::new(0.0);
    }
    let mut c = u;
    while c < vectors {
        let xv = Vector::<f32, N>::cast_from(x[t * vectors + c]);
        #[unroll]
        for e in 0..experts {
            acc[e] += xv * Vector::<f32, N>::cast_from(gate[e * vectors + c]);
        }
        c += units;
    }
    let mut shared = SharedMemory::<f32>::new(comptime!(experts * REDUCE_UNITS as usize));
    #[unroll]
    for e in 0..experts {
        let mut s = 0.0f32;
        #[unroll]
        for i in 0..nv {
            s += acc[e][i];
        }
        shared[e * units + u] = s;
    }
    sync_cube();
    cube_reduce_rows(&mut shared, experts, false);
    if u < experts {
        out[t * experts + u] = F::cast_from(shared[u * units]);
    }
}

/// Partial sums of the gate's gradient `dgate[e, c] = Σ_t dlogits[t, e] · x[t, c]`: the unit owning
/// column vector `c = CUBE_POS_X · CUBE_DIM_X + UNIT_POS_X` sums rows `CUBE_POS_Y · chunk ..` (at most
/// `chunk`) into `partials[(CUBE_POS_Y · experts + e) · vectors + c]`. A warp reads consecutive
/// vectors of one row at a time, and every unit of a cube the same `experts` gradients of that row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn gate_weight_grad_kernel<F: Float, N: Size>(
    dlogits: &Array<F>,
    x: &Array<Vector<F, N>>,
    partials: &mut Array<Vector<f32, N>>,
    tokens: usize,
    vectors: usize,
    chunk: usize,
    #[comptime] experts: usize,
) {
    let c = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if c >= vectors {
        terminate!();
    }
    let first = CUBE_POS_Y as usize * chunk;
    let last = min(tokens, first + chunk);
    let mut acc = Array::<Vector<f32, N>>::new(experts);
    #[unroll]
    for e in 0..experts {
        acc[e] = Vector::<f32, N>::new(0.0);
    }
    let mut t = first;
    while t < last {
        let xv = Vector::<f32, N>::cast_from(x[t * vectors + c]);
        #[unroll]
        for e in 0..experts {
            acc[e] += xv * Vector::<f32, N>::new(f32::cast_from(dlogits[t * experts + e]));
        }
        t += 1;
    }
    let base = CUBE_POS_Y as usize * experts;
    #[unroll]
    for e in 0..experts {
        partials[(base + e) * vectors + c] = acc[e];
    }
}

/// `dgate[i] = Σ_k partials[k · len + i]` over the `chunks` partial gradients (`len` = experts ×
/// vectors), rounded to the storage type.
#[cube(launch_unchecked)]
pub fn gate_weight_grad_finish_kernel<F: Float, N: Size>(partials: &Array<Vector<f32, N>>, dgate: &mut Array<Vector<F, N>>, len: usize, chunks: usize) {
    let i = ABSOLUTE_POS as usize;
    if i >= len {
        terminate!();
    }
    let mut acc = Vector::<f32, N>::new(0.0);
    let mut k = 0usize;
    while k < chunks {
        acc += partials[k * len + i];
        k += 1;
    }
    dgate[i] = Vector::<F, N>::cast_from(acc);
}
